#!/usr/bin/env bash
# Builds the small VM the kernel-client tests boot: Debian's stock kernel
# (its ELF vmlinux, booted through the PVH entry, which is much faster than
# the bzImage under TCG) and an initramfs with busybox, nbd-client,
# mke2fs/e2fsck, the kernel modules for virtio-net, virtio-blk (a virtual
# disk is /dev/vda), nbd and ext4, and a minimal /init (no systemd).
#
#   bash tools/vm/build.sh        # prints the directory holding the VM
#
# Everything comes from Debian packages: the kernel, busybox-static,
# nbd-client and its libnl libraries are fetched with `apt-get download`
# and unpacked with `dpkg-deb -x` into a staging folder (never into /);
# mke2fs and e2fsck are the host's (package e2fsprogs). The result is
# cached under $REPLBLK_VM_CACHE (default ~/.cache/replblk-vm) in a
# folder named after the hash of this script and cpio.py, so it is rebuilt
# only when they change. /init runs /test.sh when one is present: the tests
# append a second cpio archive holding it (see tools/vm/run.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${REPLBLK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/replblk-vm}
KEY=$(cat "$HERE/build.sh" "$HERE/cpio.py" | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [[ -s $OUT/vmlinux && -s $OUT/initramfs.cpio ]]; then
    echo "$OUT"
    exit 0
fi

log() { echo "vm/build: $*" >&2; }
START=$SECONDS
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- packages ----------------------------------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $KPKG ]]; then
    log "no package list yet; running apt-get update"
    apt-get update >&2
    KPKG=$(apt-cache depends linux-image-amd64 |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n $KPKG ]] || { log "cannot find the kernel package behind linux-image-amd64"; exit 1; }
PKGS=("$KPKG" busybox-static nbd-client libnl-3-200 libnl-genl-3-200)
log "downloading ${PKGS[*]}"
mkdir -p "$WORK/debs" "$WORK/pkg" "$WORK/root"
chmod 0777 "$WORK/debs"
(cd "$WORK/debs" && apt-get download "${PKGS[@]}" >&2)
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/pkg"
done

KVER=$(ls "$WORK/pkg/lib/modules" | head -n1)
log "kernel $KVER"

# --- the ELF vmlinux out of the bzImage's xz stream --------------------------
python3 - "$WORK/pkg/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
magic = b"\xfd7zXZ\x00"
pos = data.find(magic)
while pos >= 0:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
    except lzma.LZMAError:
        out = b""
    if out.startswith(b"\x7fELF"):
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("no xz-compressed ELF kernel found in " + sys.argv[1])
PY

# --- initramfs tree ----------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/local/sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules}
ln -s lib "$R/lib64"
cp "$WORK/pkg/bin/busybox" "$R/bin/busybox"

# Copies binary $1 to $2 inside the tree with every library ldd lists
# (libraries unpacked from the packages come first).
LIBPATH=$WORK/pkg/lib/x86_64-linux-gnu:$WORK/pkg/usr/lib/x86_64-linux-gnu
add_binary() {
    local src=$1 dst=$2 lib
    install -D -m 0755 "$src" "$R$dst"
    # mawk has no \s: [[:space:]] (the loader line has no "=>").
    for lib in $(LD_LIBRARY_PATH=$LIBPATH ldd "$src" |
        awk '/=>/ {print $3} !/=>/ && $1 ~ /^\// {print $1}' | grep '^/'); do
        local inside=${lib#"$WORK/pkg"}
        [[ -e $R$inside ]] || install -D -m 0755 "$(readlink -f "$lib")" "$R$inside"
    done
}
add_binary "$WORK/pkg/sbin/nbd-client" /usr/local/sbin/nbd-client
add_binary "$(command -v mke2fs)" /usr/local/sbin/mke2fs
add_binary "$(command -v e2fsck)" /usr/local/sbin/e2fsck
# The dynamic loader by the path binaries ask for.
[[ -e $R/lib64/ld-linux-x86-64.so.2 ]] || { log "the dynamic loader was left out"; exit 1; }
cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"

# --- kernel modules in dependency order ---------------------------------------
# Each module's "depends=" (its .modinfo section) gives the order; no
# depmod needed on the host.
python3 - "$WORK/pkg/lib/modules/$KVER" "$R/lib/modules" \
    virtio_pci virtio_net virtio_blk nbd crc32c_generic ext4 > "$R/etc/modules" <<'PY'
import lzma, os, re, sys
tree, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
paths = {}
for dirpath, _, files in os.walk(os.path.join(tree, "kernel")):
    for f in files:
        m = re.match(r"(.*)\.ko(\.xz)?$", f)
        if m:
            paths[m.group(1).replace("-", "_")] = os.path.join(dirpath, f)
builtin = open(os.path.join(tree, "modules.builtin")).read()
order, seen = [], set()
def resolve(name):
    if name in seen:
        return
    seen.add(name)
    if name not in paths:
        if re.search(r"/%s\.ko" % re.escape(name).replace("_", "[_-]"), builtin):
            return
        sys.exit("module %s not found" % name)
    data = open(paths[name], "rb").read()
    if paths[name].endswith(".xz"):
        data = lzma.decompress(data)
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    for dep in (m.group(1).decode().split(",") if m else []):
        if dep:
            resolve(dep.replace("-", "_"))
    open(os.path.join(dest, name + ".ko"), "wb").write(data)
    order.append(name)
for w in wanted:
    resolve(w)
print("\n".join(order))
PY
log "modules: $(tr '\n' ' ' < "$R/etc/modules")"

cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/modules); do
    case $m in nbd) args="nbds_max=2" ;; *) args= ;; esac
    insmod /lib/modules/$m.ko $args 2>/dev/null || echo "vm: insmod $m failed"
done
ip link set lo up
ip link set eth0 up
# No default route: the guest reaches qemu's user network (10.0.2.2 is
# the host's 127.0.0.1) and nothing beyond it.
ip addr add 10.0.2.15/24 dev eth0
echo "VM-READY $(cut -d' ' -f1 /proc/uptime)"
rc=0
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
fi
echo "VM-EXIT $rc"
sync
poweroff -f
INIT
chmod 0755 "$R/init"

mkdir -p "$WORK/out"
python3 "$HERE/cpio.py" "$R" "$WORK/out/initramfs.cpio"
mv "$WORK/vmlinux" "$WORK/out/vmlinux"
echo "$KPKG" > "$WORK/out/kernel-package"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
# Builds of earlier versions of this script are of no further use.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d -not -name "$KEY" -not -name "build.*" -exec rm -rf {} +
log "built $OUT in $((SECONDS - START)) s"
echo "$OUT"
