"""Inventory of a running VM lab (`python -m lab vm up`), made from the lab's state.

    WGJIT_VM_LAB=<prefix> pyinfra inventory/lab.py deploy.py   # from the lab's bridge namespace

`python -m lab vm up` prints the full command. Hosts and addresses are those of
lab/fleet.py, which the Vagrantfile describes too.
"""

from lab.vm.lab import inventory_groups

globals().update(inventory_groups())
