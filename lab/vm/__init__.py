"""The VMs of the lab: Debian under qemu, for what network namespaces cannot do
(kernel WireGuard, the pyinfra deploy over SSH).

- `quick.py`: a throwaway VM that boots the host's kernel with the host's root
  over 9p and runs one command (the netlink backend's tests, the JIT lab on
  kernel WireGuard); `VM` and `run_in_vm` are re-exported here.
- `kernel.py`: which installed kernel a VM boots, and the drivers it must load.
- `initramfs.py`: the quick VM's small initramfs (PID 1 from `init/`).
- `image.py`: the disk image of the VM lab (debootstrap, cached by recipe).
- `lab.py`: the VM lab itself, the deploy's targets; `cli.py` drives it by hand
  (`python -m lab vm up|down|ssh|status`).
"""

from lab.vm.quick import VM, VMError, VMTimeout, run_in_vm

__all__ = ["VM", "VMError", "VMTimeout", "run_in_vm"]
