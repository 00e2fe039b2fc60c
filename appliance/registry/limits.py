"""Limits of the registry API that its clients must respect too.

Kept apart from the blueprints so that a gateway can check its flags against
them without importing Flask.
"""

# Keys per batch lookup (POST /v1/gateway/lookup). 512 keys is a 24 KB body
# (under MAX_BODY_BYTES, 64 KB) and one indexed IN/ANY query.
MAX_LOOKUP_KEYS = 512
