# Client hosts (the Vagrant lab): wg-quick, configured from the registry's record.
client_interface = "wgjit"
client_tenant = "lab"
