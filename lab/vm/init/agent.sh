# Stage 2, PID 1 inside the VM's overlay root, run by the host's /bin/sh: finish the
# machine, then serve commands from the host over a virtio-serial port.
# Every helper here is the initramfs's static busybox (copied to /run/wgjit, so
# already in memory) or a shell builtin: under TCG, each first run of a host binary
# over 9p costs a few hundred milliseconds of boot.
#
# Protocol on the port, one line per message:
#   agent -> host  "wgjit-agent ready <uname -r>"  or  "wgjit-agent failed <why>"
#   host  -> agent "run <id> <nonce>": run <rundir>/jobs/<id>.sh with stdin
#                  from /dev/null, stdout+stderr to the port, then write
#                  "<nonce>:<id>:<exit code>" with no newline before it, so the
#                  command's output comes back byte for byte
#   host  -> agent "poweroff" (or the host closing the port): sync and power off
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
BB=/run/wgjit/busybox
read -r CMDLINE < /proc/cmdline

opt() {  # value of wgjit.<name>= on the kernel command line
    for word in $CMDLINE; do
        case "$word" in "wgjit.$1="*) echo "${word#*=}"; return ;; esac
    done
}

die() {
    echo "wgjit-agent: $*" > /dev/console
    [ -n "$port" ] && echo "wgjit-agent failed $*" >&3
    $BB sync
    $BB poweroff -f
}

JOBS="$(opt rundir)/jobs"
$BB hostname "$(opt hostname)"
$BB ip link set lo up

port=
for d in /sys/class/virtio-ports/*; do
    name=
    read -r name 2>/dev/null < "$d/name"
    [ "$name" = wgjit.ctl ] && port=/dev/${d##*/}
done
[ -n "$port" ] || die "no virtio-serial port named wgjit.ctl"
exec 3<>"$port"

modules=$(opt modules)
for m in $(IFS=,; echo $modules); do
    # The initramfs loaded the usual ones; modprobe (the host's) reads over 9p.
    [ -d "/sys/module/$m" ] && continue
    modprobe "$m" > /dev/console 2>&1 || die "modprobe $m failed"
done

echo "wgjit-agent ready $($BB uname -r)" >&3
while read -r verb id nonce <&3; do
    case "$verb" in
        run)
            $BB env -i /bin/sh "$JOBS/$id.sh" </dev/null >&3 2>&3
            printf '%s:%s:%s\n' "$nonce" "$id" "$?" >&3
            ;;
        poweroff) break ;;
    esac
done
$BB sync
$BB poweroff -f
