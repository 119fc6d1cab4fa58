#!/bin/sh
# Regenerate the NUMA topology fixtures with the real hwloc tools
# (Debian package hwloc-nox, hwloc 2.9). Run from anywhere:
#     sh topology-fixtures/generate.sh
# 1-node.xml is exported from the machine this runs on, so rerunning it on a
# different host changes that file; the other three are synthetic and stable.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# hwloc-annotate wants one distance value per line; rows are kept readable here.
dist() { tr -s " " "\n" > "$1"; }

# --- 1-node.xml: this build machine (1 package, 2 cores, 1 NUMA node) -------
lstopo --no-io --of xml "$tmp/1-node.xml"
# hwloc refuses 1x1 distance matrices (hwloc-annotate: "Invalid distances with
# nbobjs == 1"), so the trivial matrix is written by hand, in exactly the form
# lstopo uses for bigger ones. hwloc ignores it on load; disco reads a single
# node as [[10]] either way.
sed 's|^  <support name="discovery.pu"/>|  <distances2 type="NUMANode" nbobjs="1" kind="5" name="NUMALatency" indexing="os">\
    <indexes length="2">0 </indexes>\
    <u64values length="3">10 </u64values>\
  </distances2>\
  <support name="discovery.pu"/>|' "$tmp/1-node.xml" > 1-node.xml

# --- 2-socket.xml: 2 x Xeon Gold 6142-like (16 cores, 2 threads), 64 GiB/node
lstopo --if synthetic --input "pack:2 [numa(memory=64GiB)] l3:1(size=22MiB) l2:16(size=1MiB) l1d:1(size=32KiB) l1i:1(size=32KiB) core:1 pu:2(indexes=2*32:1*2)" \
    --of xml "$tmp/2-socket.xml"
dist "$tmp/2-socket.dist" <<'DIST'
name=NUMALatency
5
2
NUMANode:0
NUMANode:1
10 21
21 10
DIST
hwloc-annotate "$tmp/2-socket.xml" "$tmp/2-socket.xml" -- none -- distances "$tmp/2-socket.dist"
hwloc-annotate "$tmp/2-socket.xml" "$tmp/2-socket.xml" package:all info CPUVendor GenuineIntel
hwloc-annotate "$tmp/2-socket.xml" 2-socket.xml package:all info CPUModel "Intel(R) Xeon(R) Gold 6142 CPU @ 2.60GHz"

# --- 4-node.xml: 1 x AMD EPYC 7532-like in NPS4 (4 quadrants x 8 cores x 2
# threads, two 4-core CCDs per quadrant), 32 GiB/node, SLIT 10/11/12 ---------
lstopo --if synthetic --input "pack:1 group:4 [numa(memory=32GiB)] die:2 l3:2(size=16MiB) l2:2(size=512KiB) l1d:1(size=32KiB) l1i:1(size=32KiB) core:1 pu:2(indexes=2*32:1*2)" \
    --of xml "$tmp/4-node.xml"
dist "$tmp/4-node.dist" <<'DIST'
name=NUMALatency
5
4
NUMANode:0
NUMANode:1
NUMANode:2
NUMANode:3
10 11 12 12
11 10 12 12
12 12 10 11
12 12 11 10
DIST
hwloc-annotate "$tmp/4-node.xml" "$tmp/4-node.xml" -- none -- distances "$tmp/4-node.dist"
hwloc-annotate "$tmp/4-node.xml" "$tmp/4-node.xml" package:all info CPUVendor AuthenticAMD
hwloc-annotate "$tmp/4-node.xml" 4-node.xml package:all info CPUModel "AMD EPYC 7532 32-Core Processor"

# --- 8-node.xml: 4 x AMD Opteron 6376-like (2 dies = 2 NUMA nodes per package,
# 8 cores per die, no SMT), 32 GiB/node, sockets linked in a ring:
# 10 local, 16 other die of the same package, 22 neighbour package, 32 across.
lstopo --if synthetic --input "pack:4 die:2 [numa(memory=32GiB)] l3:1(size=8MiB) l2:4(size=2MiB) l1i:1(size=64KiB) l1d:2(size=16KiB) core:1 pu:1" \
    --of xml "$tmp/8-node.xml"
dist "$tmp/8-node.dist" <<'DIST'
name=NUMALatency
5
8
NUMANode:0
NUMANode:1
NUMANode:2
NUMANode:3
NUMANode:4
NUMANode:5
NUMANode:6
NUMANode:7
10 16 22 22 32 32 22 22
16 10 22 22 32 32 22 22
22 22 10 16 22 22 32 32
22 22 16 10 22 22 32 32
32 32 22 22 10 16 22 22
32 32 22 22 16 10 22 22
22 22 32 32 22 22 10 16
22 22 32 32 22 22 16 10
DIST
hwloc-annotate "$tmp/8-node.xml" "$tmp/8-node.xml" -- none -- distances "$tmp/8-node.dist"
hwloc-annotate "$tmp/8-node.xml" "$tmp/8-node.xml" package:all info CPUVendor AuthenticAMD
hwloc-annotate "$tmp/8-node.xml" 8-node.xml package:all info CPUModel "AMD Opteron(tm) Processor 6376"

# --- check: every file reloads and shows its NUMA distances ------------------
for f in 1-node.xml 2-socket.xml 4-node.xml 8-node.xml; do
    echo "== $f"
    lstopo --if xml --input "$f" --of console --no-caches --distances | tail -n 12
done
