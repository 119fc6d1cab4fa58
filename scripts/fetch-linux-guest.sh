#!/usr/bin/env bash
# Fetches what the Linux-guest tests and the README example boot:
#   * Debian's generic amd64 kernel (`apt-get download`, unpacked with
#     `dpkg -x`, nothing installed), as the bzImage it ships and as an ELF
#     vmlinux extracted from it (the bzImage's payload, decompressed): the
#     ELF skips the in-guest decompressor, which under instruction emulation
#     (see FACTS.md) would take many minutes;
#   * a small initramfs made from busybox-static and the kernel's virtio
#     modules (Debian builds virtio, virtio_mmio, virtio_blk and
#     virtio_console as modules) whose /init loads them, prints a marker and
#     the first sector of /dev/vda (the test disk), then resets the VM;
#   * a 1 MiB test disk image whose first sector holds a known text.
# Output directory: $DISCO_LINUX_GUEST_DIR, default target/linux-guest.
# Idempotent: does nothing when everything is already there.
# Needs: apt-get, dpkg, cpio, xz/zstd/gzip (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${DISCO_LINUX_GUEST_DIR:-target/linux-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio.gz" ] \
  && [ -s "$out/disk.img" ] && [ -s "$out/version" ] && [ "$(cat "$out/format" 2>/dev/null)" = 2 ]; then
  echo "fetch-linux-guest: present in $out ($(cat "$out/version"))"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# The kernel: linux-image-amd64 is a meta package naming the current
# linux-image-<version>-amd64.
pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$pkg" ]; then
  echo "fetch-linux-guest: cannot find the kernel package linux-image-amd64 depends on (run apt-get update?)" >&2
  exit 1
fi
echo "fetch-linux-guest: downloading $pkg"
apt-get download -q "$pkg" >/dev/null
dpkg -x ./"${pkg}"_*.deb kernel
vmlinuz="$(ls kernel/boot/vmlinuz-* | head -1)"
cp "$vmlinuz" "$out/bzImage"

# Extract the ELF vmlinux: the setup header gives the protected-mode code's
# offset ((setup_sects + 1) * 512), payload_offset (0x248) and payload_length
# (0x24c) locate the compressed kernel inside it.
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects="$(u8 "$vmlinuz" $((0x1f1)))"
[ "$setup_sects" -eq 0 ] && setup_sects=4
pm_offset=$(((setup_sects + 1) * 512))
payload_offset="$(u32 "$vmlinuz" $((0x248)))"
payload_length="$(u32 "$vmlinuz" $((0x24c)))"
dd if="$vmlinuz" of=payload iflag=skip_bytes,count_bytes skip=$((pm_offset + payload_offset)) count="$payload_length" status=none
magic="$(od -An -tx1 -N4 payload | tr -d ' ')"
case "$magic" in
  28b52ffd*) zstd -dc payload > vmlinux 2>/dev/null || true ;;
  fd377a58*) xz -dc payload > vmlinux 2>/dev/null || true ;;
  1f8b*) gzip -dc payload > vmlinux 2>/dev/null || true ;;
  *) echo "fetch-linux-guest: unknown compression (magic $magic) in $vmlinuz" >&2; exit 1 ;;
esac
if [ "$(od -An -tx1 -N4 vmlinux | tr -d ' ')" != "7f454c46" ]; then
  echo "fetch-linux-guest: the payload of $vmlinuz did not decompress to an ELF file" >&2
  exit 1
fi
cp vmlinux "$out/vmlinux"

# The initramfs: busybox-static and an /init script.
echo "fetch-linux-guest: downloading busybox-static"
apt-get download -q busybox-static >/dev/null
dpkg -x ./busybox-static_*.deb bb
mkdir -p root/bin root/dev root/proc root/sys root/modules
cp bb/bin/busybox root/bin/busybox
for m in virtio virtio_ring virtio_mmio virtio_blk virtio_console; do
  ko="$(find kernel/lib/modules -name "$m.ko*" | head -1)"
  if [ -z "$ko" ]; then
    echo "fetch-linux-guest: module $m not found in $pkg" >&2
    exit 1
  fi
  cp "$ko" root/modules/
done
for applet in sh mount echo cat dd head grep insmod reboot sleep uname mknod ls; do
  ln -s busybox "root/bin/$applet"
done
cat > root/init <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "DISCO-INIT-OK $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
for m in virtio virtio_ring virtio_mmio virtio_blk virtio_console; do
  insmod /modules/$m.ko* || echo "DISCO-INIT: insmod $m failed"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
if [ -b /dev/vda ]; then
  echo "DISCO-DISK: $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 64)"
else
  echo "DISCO-DISK: no /dev/vda"
fi
echo "DISCO-HVC: $(ls /dev/hvc0 2>/dev/null)"
echo "DISCO-INIT-DONE"
reboot -f
EOF
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet) | gzip -9 > "$out/initramfs.cpio.gz"

# The test disk: a known first sector, zeros after.
printf 'disco test disk: sector 0 says hello' > disk.img
truncate -s 1M disk.img
cp disk.img "$out/disk.img"

echo "$pkg" > "$out/version"
echo 2 > "$out/format"   # bump when the initramfs or disk changes
echo "fetch-linux-guest: $pkg -> $out (bzImage, vmlinux, initramfs.cpio.gz, disk.img)"
