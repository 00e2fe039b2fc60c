# Every host. Per-fleet values (registry_url, addresses) are in the inventory.

# Target Python for the wheels built on the controller (Debian 12: 3.11).
target_python = "3.11"
# apt-get update before installing packages (at most hourly). The VM lab's image
# has every package already and no route to a mirror, so its inventory says False.
apt_update = True
