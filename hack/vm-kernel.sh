#!/usr/bin/env bash
# Prepares (once) Debian 12's current kernel for the VM tier (harness/vm.py) and prints its folder,
# ${KVPN_CACHE:-~/.cache/kvpn}/vm:
#   release          the kernel release, e.g. 6.1.0-57-amd64
#   kernel/          the linux-image package unpacked with dpkg-deb (NEVER installed as the host's kernel),
#                    with the module index depmod -b made for it (the .deb ships none)
#   vmlinuz          that package's compressed kernel
#   vmlinux          the uncompressed kernel qemu boots by its PVH entry (seconds faster under software
#                    emulation); present only when a probe boot with it reached the initramfs' init
#   initramfs.cpio   busybox and the modules the guest loads before it can mount the host's root over 9p
#                    (virtio, 9p, overlay), with the guest's init (write_init below)
#   ready            written last: a digest of this script, which the initramfs is made from
# Cached: when `ready` matches this script a run only prints the folder; when only the script changed, the
# unpacked kernel is kept and the initramfs rebuilt. `rm -rf ~/.cache/kvpn/vm` fetches the kernel that is
# current then. Debian's archive is read through a private apt configuration under the folder, as
# hack/control-plane.sh does; the host's apt state is not touched. Needs kmod, busybox-static, cpio and
# qemu-system-x86 (`make debs`).
set -euo pipefail

cache=${KVPN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpn}
dir=$cache/vm

stamp=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16) # harness/vm.py compares it too
is_ready() { [ "$(cat "$dir/ready" 2>/dev/null)" = "$stamp" ]; }
if is_ready; then echo "$dir"; exit 0; fi
# One preparation at a time per cache (two `make setup`s at once).
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if is_ready; then echo "$dir"; exit 0; fi

log() { echo "vm-kernel: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=hack/progress.sh
. "$(dirname "${BASH_SOURCE[0]}")/progress.sh"
PATH=$PATH:/usr/sbin:/sbin # depmod and modprobe live there; a user's PATH may lack them
for tool in apt-get dpkg-deb depmod modprobe cpio qemu-system-x86_64; do
  command -v "$tool" >/dev/null || die "$tool is missing: run \`make debs\`"
done
busybox=/bin/busybox # from busybox-static: the initramfs has no C library
dpkg-query -W -f='${db:Status-Status}\n' busybox-static 2>/dev/null | grep -qx installed \
  || die "busybox-static is missing: run \`make debs\`"

work=$dir/work
apt_dir=$work/apt
rm -rf "$work"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
trap 'rm -rf "$work"' EXIT

# The bookworm suites (main, updates, security) with the addresses and keyrings the machine already
# trusts: the current kernel is usually in bookworm-security.
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || die "cannot read the Debian archive from $sources"
awk '
  function flush() {
    if (uris != "" && key != "")
      for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++)
        if (s[j] ~ /^bookworm/) printf "deb [signed-by=%s] %s %s main\n", key, u[i], s[j]
    uris = key = ""; nu = ns = 0
  }
  /^[ \t]*$/ { flush(); next }
  /^URIs:/ { uris = $0; nu = split(substr($0, 6), u, " ") }
  /^Suites:/ { ns = split(substr($0, 8), s, " ") }
  /^Signed-By:/ { key = $2 }
  END { flush() }
' "$sources" >"$apt_dir/sources.list"
[ -s "$apt_dir/sources.list" ] || die "no bookworm entries in $sources"
papt() {
  apt-get -q -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
    -o Acquire::Languages=none -o APT::Sandbox::User="$(id -un)" "$@"
}
pcache() {
  apt-cache -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" "$@"
}

# The guest's /init. harness/vm.py boots it with the host's / as 9p tag kvpnroot (read-only) and a
# results folder as tag kvpnresults; kvpn.modules= on the command line names this folder's lib/modules.
# Stage 1, in the initramfs: modules; a tmpfs overlay over the host's root (all of it writable in the
# guest, nothing written back), fresh tmpfs on /tmp /run /var/tmp (but for the command's folder, kvpn.keep=,
# when it is under one of them); the results share on /run/kvpn-vm/results;
# /dev, /lib/modules, the module loader's wrapper, loopback; then switch_root, which PID 1 must do itself
# so that the kernel's own helpers (the module auto-loader) run in the new root too.
# Stage 2, PID 1 in that root: run the host's command script with its output and exit status in the
# results share, then power off. Any failure powers off without a status: the host reports the console.
write_init() {
  cat >"$1" <<'INIT'
#!/bin/busybox sh
bb=/bin/busybox
say() { $bb echo "kvpn-vm: $*"; }
fail() { say "FAILED: $*"; $bb sync; $bb poweroff -f; $bb sleep 1000; }

if [ "$1" = stage2 ]; then
  results=/run/kvpn-vm/results
  cd / || fail "cd /"
  $bb cat /proc/uptime >"$results/started"
  $bb env -i /bin/sh "$results/command" </dev/null >"$results/output" 2>&1
  $bb echo $? >"$results/status.new"
  $bb mv "$results/status.new" "$results/status"
  $bb sync
  $bb poweroff -f
  $bb sleep 1000
fi

# The initramfs has no /dev/console (it is built without root): open it once devtmpfs is there.
$bb mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
$bb --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /modules/order); do insmod "/modules/$m" || fail "insmod $m"; done
if grep -qw kvpn.probe /proc/cmdline; then say "probe ok"; poweroff -f; sleep 1000; fi
modules= keep=
for arg in $(cat /proc/cmdline); do
  case $arg in
    kvpn.modules=*) modules=${arg#kvpn.modules=} ;;
    kvpn.keep=*) keep=${arg#kvpn.keep=} ;;
  esac
done
[ -n "$modules" ] || fail "no kvpn.modules= on the kernel command line"

n=/newroot
mkdir -p /lower /rw $n
# cache=loose: the host's files do not change under a test run, and Python's imports are mostly stat calls.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 kvpnroot /lower || fail "mount the host's root"
mount -t tmpfs -o mode=0755 overlay-rw /rw && mkdir /rw/upper /rw/work
# xino=off: with it overlayfs looks up every entry a readdir returns (one 9p round trip each), which made
# a cold `import kubernetes` take 27 s instead of 11 s.
mount -t overlay -o xino=off,index=off,metacopy=off,redirect_dir=off,lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work \
  root $n || fail "mount the overlay"
# The command's folder (kvpn.keep=, the checkout) stays visible when it is under /tmp or /var/tmp, which
# are replaced below: a clone there (a CI's) is bound aside from the overlay first, then put back.
mkdir -p /keep
case $keep in
  /tmp/*|/var/tmp/*) mount --bind "$n$keep" /keep || fail "bind $keep" ;;
  *) keep= ;;
esac
# Fresh, not the host's: /run holds the host's netns pins, sockets and pid files.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $n/run
for d in tmp var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$n/$d"; done
if [ -n "$keep" ]; then mkdir -p "$n$keep" && mount --move /keep "$n$keep" || fail "put back $keep"; fi
mkdir -p $n/run/lock $n/run/kvpn-vm/results
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 kvpnresults $n/run/kvpn-vm/results \
  || fail "mount the results share"
cp /bin/busybox /init $n/run/kvpn-vm/
# request_module() runs this for `ip link add ... type wireguard`: kmod's modprobe, or busybox's if the
# host has no kmod. Both read the index depmod made for the unpacked kernel, bound on /lib/modules.
cat >$n/run/kvpn-vm/modprobe <<'WRAP'
#!/run/kvpn-vm/busybox sh
[ -x /sbin/modprobe ] && exec /sbin/modprobe "$@"
exec /run/kvpn-vm/busybox modprobe "$@"
WRAP
chmod 0755 $n/run/kvpn-vm/modprobe $n/run/kvpn-vm/init
echo /run/kvpn-vm/modprobe >/proc/sys/kernel/modprobe
mkdir -p $n/lib/modules && mount --bind "/lower$modules" $n/lib/modules || fail "bind $modules"

uptime=$(cut -d' ' -f1 /proc/uptime)
for fs in dev proc sys; do mount --move /$fs $n/$fs; done
mount -t cgroup2 cgroup2 $n/sys/fs/cgroup 2>/dev/null
mkdir -p $n/dev/pts $n/dev/shm $n/dev/net
mount -t devpts -o newinstance,ptmxmode=0666 devpts $n/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $n/dev/shm
# nft -f -, bash's process substitution and wireguard-go need these; devtmpfs has no /dev/net/tun until
# the tun module is loaded, and opening the node loads it.
ln -sf /proc/self/fd $n/dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -sf "/proc/self/fd/${i%%:*}" "$n/dev/${i#*:}"; done
[ -e $n/dev/net/tun ] || mknod -m 0666 $n/dev/net/tun c 10 200
ip link set lo up
hostname kvpn-vm
say "root ready after $uptime s"
exec switch_root $n /run/kvpn-vm/busybox sh /run/kvpn-vm/init stage2
INIT
  chmod 0755 "$1"
}

rm -f "$dir/ready"
release=$(cat "$dir/release" 2>/dev/null || true)
# The steps: the initramfs, the uncompressed kernel and the probe boot, after fetching and unpacking
# the kernel unless it is unpacked already.
if [ -n "$release" ] && [ -f "$dir/kernel/lib/modules/$release/modules.dep" ] && [ -f "$dir/vmlinuz" ]; then
  steps=3
  log "kernel $release already unpacked; rebuilding the initramfs"
else
  steps=6
  step "reading Debian 12's package lists (a few seconds)"
  papt update >&2
  package=$(pcache depends linux-image-amd64 | awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}')
  [ -n "$package" ] || die "linux-image-amd64 depends on no linux-image-6.1.0-*-amd64"
  step "fetching $package (about 70 MB)"
  fetch() (cd "$work" && papt download "$package" >&2)
  ticking "fetching $package" fetch
  step "unpacking it (not installing it) and indexing its modules (a few seconds)"
  rm -rf "$dir/kernel" "$dir/vmlinux" "$dir/vmlinuz" "$dir/initramfs.cpio" "$dir/release"
  dpkg-deb -x "$work/${package}"_*.deb "$dir/kernel"
  release=${package#linux-image-}
  [ -d "$dir/kernel/lib/modules/$release" ] || die "the package has no lib/modules/$release"
  depmod -b "$dir/kernel" "$release"
  ln -s "kernel/boot/vmlinuz-$release" "$dir/vmlinuz"
  echo "$release" >"$dir/release"
fi

# The initramfs: busybox, the modules that 9p and overlay need in dependency order, and the init.
step "the initramfs: busybox, the modules for virtio, 9p and overlay, the guest's init (a second)"
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,modules}
cp "$busybox" "$initrd/bin/busybox"
write_init "$initrd/init"
wanted="virtio_pci 9pnet_virtio 9p overlay"
for module in $wanted; do
  modprobe -d "$dir/kernel" -S "$release" --show-depends "$module" \
    || die "$module not found among $release's modules"
done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' >"$work/insmod"
while read -r path; do # absolute paths under $dir/kernel
  cp "$path" "$initrd/modules/"
  basename "$path" >>"$initrd/modules/order"
done <"$work/insmod"
(cd "$initrd" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) >"$work/initramfs.cpio"
log "initramfs: $(wc -c <"$work/initramfs.cpio") bytes, modules: $(tr '\n' ' ' <"$initrd/modules/order")"

# Debian compresses the kernel with XZ; the uncompressed ELF inside carries the PVH entry note
# (Xen's PHYS32_ENTRY) that lets qemu skip the real-mode boot and the decompression, both slow in TCG.
step "the uncompressed kernel for qemu's PVH entry (a few seconds)"
python3 - "$dir/vmlinuz" "$work/vmlinux" <<'PY' >&2 || true
import lzma, struct, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vm-kernel: no XZ stream in the kernel image")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF" or elf[4] != 2:
    sys.exit("vm-kernel: the XZ stream is not a 64-bit ELF")
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
pvh = False
for i in range(phnum):
    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
    at, end = p_offset, p_offset + p_filesz
    while p_type == 4 and at + 12 <= end:  # PT_NOTE
        namesz, descsz, n_type = struct.unpack_from("<III", elf, at)
        name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
        pvh |= name == b"Xen" and n_type == 18  # XEN_ELFNOTE_PHYS32_ENTRY
        at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
if not pvh:
    sys.exit("vm-kernel: the kernel has no PVH entry")
open(sys.argv[2], "wb").write(elf)
PY

# A probe boot: load the initramfs' modules, report, power off. Proves the kernel and initramfs work
# together, and decides between the PVH kernel and the compressed one.
probe() {
  timeout 180 qemu-system-x86_64 -accel tcg,tb-size=256 -cpu max -m 512M -smp 2 -nographic -no-reboot \
    -nodefaults -no-user-config -nic none -serial stdio -kernel "$1" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 quiet panic=-1 mitigations=off kvpn.probe" </dev/null 2>&1 | tr -d '\r' \
    >"$work/probe.log" || true
  grep -q 'kvpn-vm: probe ok' "$work/probe.log" # SeaBIOS' last line has no newline before it
}
step "a probe boot of the kernel and initramfs under qemu (software emulation: about 10 s)"
# Replaced by rename, so that a guest booting meanwhile reads whole files.
pvh=
if [ -f "$work/vmlinux" ]; then
  log "probe boot with the uncompressed kernel (PVH entry)"
  began=$SECONDS
  if probe "$work/vmlinux"; then
    pvh=yes
    log "PVH boot works ($((SECONDS - began)) s to power-off)"
  else
    log "PVH boot failed; the runner boots the compressed kernel. Its console:"
    tail -n 20 "$work/probe.log" >&2
  fi
fi
if [ -z "$pvh" ]; then
  log "probe boot with the compressed kernel"
  probe "$dir/vmlinuz" || { tail -n 20 "$work/probe.log" >&2; die "the guest did not reach its init"; }
fi
mv "$work/initramfs.cpio" "$dir/initramfs.cpio"
if [ -n "$pvh" ]; then mv "$work/vmlinux" "$dir/vmlinux"; else rm -f "$dir/vmlinux"; fi

echo "$stamp" >"$dir/ready"
echo "$dir"
