#!/usr/bin/env bash
# Runs the test guest's virtio-pci driver (tg.virtio) under QEMU TCG and checks
# its output, the disk file and the frames on a UDP socket netdev.
#   vmm/test-guest/qemu-virtio.sh            (from anywhere; needs qemu-system-x86_64, python3)
# Runs: q35 (MCFG) with blk+rng+net, tg.netrx against a UDP peer, a burst and a
# seed; pc (no MCFG); q35 with tg.pciassign, an MSI-X-less rng and a 2 GiB
# ivshmem BAR that pushes the virtio 64-bit BARs above 4 GiB; microvm,pcie=on
# (ECAM only); vhost-user-blk-pci
# against qemu-storage-daemon when installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=${TG_TARGET_DIR:-$work/target}
cargo build -q --release --target x86_64-unknown-none --manifest-path "$here/Cargo.toml" \
    --features qemu --target-dir "$target"
kernel=$target/x86_64-unknown-none/release/test-guest
disk=$work/disk.img
truncate -s 16M "$disk"
port=$((20000 + RANDOM % 20000))

qemu() {
    timeout 60 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
        -debugcon file:/dev/null -kernel "$kernel" "$@" 2>&1 | tr -d '\r'
}
blk=(-drive "if=none,id=d0,file=$disk,format=raw"
    -device virtio-blk-pci,drive=d0,disable-legacy=on,romfile=,serial=tgdisk0)
rng=(-device virtio-rng-pci,disable-legacy=on,romfile=)
fail=0
expect() { # output file, then extended regexps that must each match a whole line
    local f=$1
    shift
    for l in "$@"; do
        if ! grep -qxE -- "$l" "$f"; then
            echo "MISSING in $(basename "$f"): $l"
            fail=1
        fi
    done
    if grep -q 'TG: FAIL' "$f"; then
        grep 'TG: FAIL' "$f"
        fail=1
    fi
}

# 1. q35: blk + rng + net with a UDP peer that checks our frame and answers.
python3 - "$port" >"$work/peer.txt" 2>&1 <<'EOF' &
import socket, sys
p = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", p))
s.settimeout(60)
while True:
    f, _ = s.recvfrom(4096)
    if f[12:14] == b"\x88\xb5":
        break
ok = f[0:6] == b"\xff" * 6 and f[14:33] == b"TG virtio-net hello" and len(f) == 60
print("peer frame", "ok" if ok else "BAD", f.hex(), flush=True)
s.sendto(f[6:12] + bytes.fromhex("020000000002") + b"\x88\xb5" + b"hello from the host peer",
         ("127.0.0.1", p + 1))
EOF
peer=$!
sleep 0.3
qemu -M q35 -append 'tg.virtio tg.seed=7 tg.blkburst=8 tg.netrx tg.msixmask' "${blk[@]}" "${rng[@]}" \
    -netdev "socket,id=n0,udp=127.0.0.1:$port,localaddr=127.0.0.1:$((port + 1))" \
    -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile=,mac=52:54:00:aa:bb:cc \
    >"$work/q35.txt" || true
wait "$peer" || true
grep 'TG: \(pci\|ecam\|virtio\|blk\|rng\|net\|PASS\|FAIL\)' "$work/q35.txt"
expect "$work/q35.txt" 'TG: ecam ok' 'TG: blk capacity=32768' 'TG: blk write ok' \
    'TG: blk read ok' 'TG: blk flush ok' 'TG: blk id=tgdisk0' 'TG: blk irqs=4' \
    'TG: blk msix mask ok pba=1' 'TG: blk burst ok n=8' 'TG: blk reinit ok' 'TG: rng bytes=64 nonzero=(4[0-9]|5[0-9]|6[0-4])' \
    'TG: net mac=52:54:00:aa:bb:cc' 'TG: net tx ok' 'TG: net rx len=38 type=88b5' \
    'TG: net rx payload=hello from the host peer' 'TG: PASS'
cat "$work/peer.txt"
grep -q 'peer frame ok' "$work/peer.txt" || fail=1
python3 - "$disk" <<'EOF' || fail=1
import struct, sys
d = open(sys.argv[1], "rb").read()
M = 2**64
bad = [o for o in range(4096, 8192 + 8 * 4096, 8)
       if struct.unpack_from("<Q", d, o)[0] != ((o | 7 << 48) * 0x9E3779B97F4A7C15) % M]
print("disk pattern", "ok" if not bad else "BAD at %d" % bad[0])
sys.exit(1 if bad else 0)
EOF

# 2. pc: no MCFG; slirp for net (TX only).
qemu -M pc -append 'tg.virtio' "${blk[@]}" "${rng[@]}" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile= \
    >"$work/pc.txt" || true
expect "$work/pc.txt" 'TG: ecam none' 'TG: blk reinit ok' 'TG: net tx ok' 'TG: PASS'
echo "pc: $(grep -c '^TG: ' "$work/pc.txt") lines, $(grep -c 'TG: pci ' "$work/pc.txt") functions"

# 3. q35: BARs assigned by the guest, rng without MSI-X, 64-bit BARs above 4 GiB.
qemu -M q35 -nic none -append 'tg.virtio tg.pciassign' \
    -object memory-backend-ram,id=hm,size=2G -device ivshmem-plain,memdev=hm \
    "${blk[@]}" -device virtio-rng-pci,disable-legacy=on,romfile=,vectors=0 \
    >"$work/assign.txt" || true
expect "$work/assign.txt" 'TG: blk reinit ok' 'TG: virtio 00:04.0 no msix, polling' 'TG: PASS'
qemu -M q35 -nic none -append 'tg.virtio' \
    -object memory-backend-ram,id=hm,size=2G -device ivshmem-plain,memdev=hm \
    "${blk[@]}" "${rng[@]}" >"$work/high.txt" || true
expect "$work/high.txt" 'TG: blk reinit ok' 'TG: rng bytes=64 nonzero=(4[0-9]|5[0-9]|6[0-4])' 'TG: PASS'

# 4. microvm with PCIe (GPEX): ECAM only, BARs assigned by the guest, transitional rng.
#    No i8042 there: the guest halts after PASS and timeout ends QEMU.
timeout 10 qemu-system-x86_64 -accel tcg -M microvm,pcie=on -m 128M -nodefaults -no-user-config \
    -display none -serial stdio -debugcon file:/dev/null -no-reboot -kernel "$kernel" \
    -append 'tg.virtio tg.ecam=0xe0000000 tg.barbase=0xc0000000 tg.msixmask' \
    "${blk[@]}" -device virtio-rng-pci,romfile= 2>/dev/null | tr -d '\r' >"$work/microvm.txt" || true
expect "$work/microvm.txt" 'TG: pci no devices via 0xcf8, using ecam 0xe0000000' \
    'TG: virtio 00:02.0 type=4 \(transitional 1005\)' 'TG: blk msix mask ok pba=1' \
    'TG: blk reinit ok' 'TG: rng bytes=64 nonzero=(4[0-9]|5[0-9]|6[0-4])' 'TG: PASS'
echo "microvm,pcie=on: $(grep -c 'TG: pci ' "$work/microvm.txt") functions via ECAM"

# 5. vhost-user-blk-pci against qemu-storage-daemon (shared memfd guest RAM).
if command -v qemu-storage-daemon >/dev/null; then
    truncate -s 16M "$work/qsd.img"
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$work/qsd.img" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$work/vub.sock,writable=on" \
        >"$work/qsd.log" 2>&1 &
    qsd=$!
    for _ in $(seq 50); do [ -S "$work/vub.sock" ] && break; sleep 0.1; done
    qemu -M q35 -nic none -append 'tg.virtio tg.blkburst=4 tg.seed=9 tg.msixmask' \
        -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
        -chardev "socket,id=c0,path=$work/vub.sock" \
        -device vhost-user-blk-pci-non-transitional,chardev=c0,romfile= >"$work/vub.txt" || true
    kill "$qsd" 2>/dev/null || true
    wait "$qsd" 2>/dev/null || true
    expect "$work/vub.txt" 'TG: blk write ok' 'TG: blk read ok' 'TG: blk flush ok' \
        'TG: blk id=vhost_user_blk' 'TG: blk irqs=[4-9]' 'TG: blk msix mask ok pba=1' 'TG: blk burst ok n=4' \
        'TG: blk reinit ok' 'TG: PASS'
    echo "vhost-user-blk (qemu-storage-daemon): $(grep 'TG: blk irqs' "$work/vub.txt")"
fi

if [ "$fail" = 0 ]; then echo "qemu-virtio: PASS"; else echo "qemu-virtio: FAIL"; fi
exit "$fail"
