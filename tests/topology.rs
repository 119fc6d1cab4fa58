//! Topology loading: the shipped fixtures, arbitrary hwloc XML files, the host,
//! and the mapping of fixture nodes onto host nodes and CPUs. No KVM needed.
//!
//! The expected node/CPU/distance values are read from the XML files with a
//! small independent string scan, not hard-coded and not through hwloc.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

mod common;

use disco::topology::{DistanceOrigin, HostNode, HostView, Topology, TopologySource};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topology-fixtures")
}

fn fixture_path(name: &str) -> PathBuf {
    fixture_dir().join(format!("{name}.xml"))
}

// ---------------------------------------------------------------------------
// A minimal, independent reading of an hwloc XML file.

/// Value of attribute `name` in an XML start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let start = tag.find(&pat)? + pat.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// All start tags beginning with `prefix`, e.g. `<object type="NUMANode"`.
fn tags<'a>(xml: &'a str, prefix: &str) -> Vec<&'a str> {
    xml.match_indices(prefix)
        .map(|(i, _)| {
            let end = xml[i..].find('>').expect("unterminated tag") + i;
            &xml[i..=end]
        })
        .collect()
}

/// Bits set in an hwloc bitmap string such as "0x0000ffff,0x0000ffff"
/// (comma-separated 32-bit words, most significant first).
fn bitmap_bits(s: &str) -> BTreeSet<u32> {
    let words: Vec<&str> = s.split(',').collect();
    let mut bits = BTreeSet::new();
    for (k, w) in words.iter().rev().enumerate() {
        let v = u32::from_str_radix(w.trim_start_matches("0x"), 16).expect("hex word");
        for b in 0..32 {
            if v & (1 << b) != 0 {
                bits.insert(k as u32 * 32 + b);
            }
        }
    }
    bits
}

#[derive(Debug)]
struct XmlNode {
    os_index: u32,
    cpus: BTreeSet<u32>,
    memory: u64,
}

#[derive(Debug)]
struct XmlFacts {
    /// In document order, which is hwloc's logical order for NUMA nodes.
    nodes: Vec<XmlNode>,
    pus: BTreeSet<u32>,
    /// Distances keyed by (from os_index, to os_index), if a matrix with more
    /// than one node is present.
    distances: Option<BTreeMap<(u32, u32), u32>>,
}

fn scan(xml: &str) -> XmlFacts {
    let nodes = tags(xml, r#"<object type="NUMANode""#)
        .into_iter()
        .map(|t| XmlNode {
            os_index: attr(t, "os_index").unwrap().parse().unwrap(),
            cpus: bitmap_bits(attr(t, "cpuset").unwrap()),
            memory: attr(t, "local_memory").map_or(0, |m| m.parse().unwrap()),
        })
        .collect();
    let pus = tags(xml, r#"<object type="PU""#)
        .into_iter()
        .map(|t| attr(t, "os_index").unwrap().parse().unwrap())
        .collect();
    let distances = xml
        .find(r#"<distances2 type="NUMANode""#)
        .and_then(|start| {
            let end = xml[start..].find("</distances2>").unwrap() + start;
            let block = &xml[start..end];
            let head = tags(block, "<distances2")[0];
            let n: usize = attr(head, "nbobjs").unwrap().parse().unwrap();
            assert_eq!(
                attr(head, "indexing"),
                Some("os"),
                "test only reads os indexing"
            );
            let between = |open: &str| -> Vec<u64> {
                let mut out = Vec::new();
                for (i, _) in block.match_indices(open) {
                    let a = block[i..].find('>').unwrap() + i + 1;
                    let b = block[a..].find('<').unwrap() + a;
                    out.extend(
                        block[a..b]
                            .split_whitespace()
                            .map(|v| v.parse::<u64>().unwrap()),
                    );
                }
                out
            };
            let idx = between("<indexes");
            let vals = between("<u64values");
            assert_eq!(idx.len(), n);
            assert_eq!(vals.len(), n * n);
            if n < 2 {
                return None; // hwloc ignores 1x1 matrices
            }
            let mut m = BTreeMap::new();
            for i in 0..n {
                for j in 0..n {
                    m.insert((idx[i] as u32, idx[j] as u32), vals[i * n + j] as u32);
                }
            }
            Some(m)
        });
    XmlFacts {
        nodes,
        pus,
        distances,
    }
}

/// Check a loaded topology against the XML it came from.
fn check_against_xml(t: &Topology, xml: &str, what: &str) {
    let f = scan(xml);
    assert!(!f.nodes.is_empty(), "{what}: XML has NUMA nodes");
    assert_eq!(t.node_count(), f.nodes.len(), "{what}: node count");
    assert_eq!(t.nodes.len(), t.distances.len(), "{what}: matrix rows");
    let mut all_cpus = BTreeSet::new();
    for (i, (n, x)) in t.nodes.iter().zip(&f.nodes).enumerate() {
        assert_eq!(n.index, i, "{what}: node {i} index");
        assert_eq!(n.os_index, x.os_index, "{what}: node {i} os_index");
        let cpus: BTreeSet<u32> = n.cpus.iter().copied().collect();
        assert_eq!(cpus.len(), n.cpus.len(), "{what}: node {i} duplicate CPUs");
        assert_eq!(cpus, x.cpus, "{what}: node {i} CPUs");
        assert_eq!(n.memory_bytes, x.memory, "{what}: node {i} memory");
        assert!(n.memory_bytes > 0, "{what}: node {i} has memory");
        all_cpus.extend(cpus);
    }
    assert_eq!(all_cpus, f.pus, "{what}: every PU is in exactly one node");
    assert_eq!(t.cpu_count(), f.pus.len(), "{what}: CPU count");
    let n = t.node_count();
    for i in 0..n {
        assert_eq!(t.distances[i].len(), n, "{what}: matrix row {i}");
        for j in 0..n {
            let expected = match &f.distances {
                Some(m) => m[&(f.nodes[i].os_index, f.nodes[j].os_index)],
                None if i == j => 10,
                None => 20,
            };
            assert_eq!(t.distance(i, j), expected, "{what}: distance {i}->{j}");
        }
    }
    match (&f.distances, n) {
        (Some(_), _) => assert!(
            matches!(t.distance_origin, DistanceOrigin::Hwloc { .. }),
            "{what}: {:?}",
            t.distance_origin
        ),
        (None, 1) => assert_eq!(t.distance_origin, DistanceOrigin::SingleNode, "{what}"),
        (None, _) => assert_eq!(t.distance_origin, DistanceOrigin::Default, "{what}"),
    }
}

/// The mapping covers every node with a host node and host CPUs that exist.
fn check_mapping(t: &Topology, host: &HostView, what: &str) {
    let host_nodes: BTreeMap<u32, &HostNode> = host.nodes.iter().map(|h| (h.os_index, h)).collect();
    let all: BTreeSet<usize> = host.all_cpus().into_iter().collect();
    assert_eq!(t.host_nodes, host.nodes.len(), "{what}: host_nodes");
    assert_eq!(t.host_cpus, all.len(), "{what}: host_cpus");
    for n in &t.nodes {
        let expected = &host.nodes[n.index % host.nodes.len()];
        assert_eq!(
            n.host_node, expected.os_index,
            "{what}: node {} host node",
            n.index
        );
        let h = host_nodes[&n.host_node];
        let pool = if h.cpus.is_empty() {
            all.len()
        } else {
            h.cpus.len()
        };
        assert_eq!(
            n.host_cpus.len(),
            n.cpus.len().min(pool),
            "{what}: node {} host CPUs",
            n.index
        );
        let distinct: BTreeSet<usize> = n.host_cpus.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            n.host_cpus.len(),
            "{what}: node {} distinct",
            n.index
        );
        for k in 0..n.cpus.len() {
            let c = n.host_cpu_for(k).expect("a host CPU for every fixture CPU");
            assert!(n.host_cpus.contains(&c));
        }
        for c in &n.host_cpus {
            assert!(
                all.contains(c),
                "{what}: node {} host CPU {c} exists",
                n.index
            );
            if !h.cpus.is_empty() {
                assert!(
                    h.cpus.contains(c),
                    "{what}: node {} host CPU {c} is local",
                    n.index
                );
            }
        }
    }
    let used_nodes: BTreeSet<u32> = t.nodes.iter().map(|n| n.host_node).collect();
    let used_cpus: BTreeSet<usize> = t
        .nodes
        .iter()
        .flat_map(|n| n.host_cpus.iter().copied())
        .collect();
    let emulated = used_nodes.len() < t.node_count() || used_cpus.len() < t.cpu_count();
    assert_eq!(t.is_emulated(), emulated, "{what}: is_emulated");
}

// ---------------------------------------------------------------------------

#[test]
fn fixture_names_match_files() {
    let names = Topology::fixture_names();
    assert_eq!(names, ["1-node", "2-socket", "4-node", "8-node"]);
    for name in names {
        assert!(fixture_path(name).is_file(), "{name}.xml exists");
    }
}

#[test]
fn every_fixture_loads_by_name_and_by_file() {
    let host = HostView::detect().expect("host view");
    for name in Topology::fixture_names() {
        let path = fixture_path(name);
        let xml = std::fs::read_to_string(&path).unwrap();

        let by_name = Topology::from_fixture_name(name).expect(name);
        assert_eq!(by_name.name, *name);
        assert!(
            matches!(&by_name.source, TopologySource::Fixture { name: n, path: None } if n == name),
            "{:?}",
            by_name.source
        );
        check_against_xml(&by_name, &xml, &format!("{name} by name"));
        check_mapping(&by_name, &host, &format!("{name} by name"));

        let by_file = Topology::from_xml_file(&path).expect(name);
        assert!(
            matches!(&by_file.source, TopologySource::Fixture { path: Some(p), .. } if p == &path),
            "{:?}",
            by_file.source
        );
        check_against_xml(&by_file, &xml, &format!("{name} by file"));
        check_mapping(&by_file, &host, &format!("{name} by file"));
        assert_eq!(
            by_name.nodes, by_file.nodes,
            "{name}: same nodes either way"
        );
        assert_eq!(by_name.distances, by_file.distances);

        // The matrix is what lstopo wrote, with 10 on the diagonal.
        for i in 0..by_name.node_count() {
            assert_eq!(by_name.distance(i, i), 10, "{name}: local distance");
        }
    }
}

#[test]
fn fixture_shapes_are_the_advertised_ones() {
    // (nodes, CPUs per node, distinct distance values): the shapes the
    // README promises, checked against the XML-derived numbers above.
    let expect: &[(&str, usize, usize, &[u32])] = &[
        ("2-socket", 2, 32, &[10, 21]),
        ("4-node", 4, 16, &[10, 11, 12]),
        ("8-node", 8, 8, &[10, 16, 22, 32]),
    ];
    for (name, nodes, per_node, values) in expect {
        let t = Topology::from_fixture_name(name).unwrap();
        assert_eq!(t.node_count(), *nodes, "{name}");
        for n in &t.nodes {
            assert_eq!(n.cpus.len(), *per_node, "{name} node {}", n.index);
        }
        let distinct: BTreeSet<u32> = t.distances.iter().flatten().copied().collect();
        assert_eq!(distinct.into_iter().collect::<Vec<_>>(), *values, "{name}");
        // Symmetric matrices.
        for i in 0..t.node_count() {
            for j in 0..t.node_count() {
                assert_eq!(t.distance(i, j), t.distance(j, i), "{name} {i}<->{j}");
            }
        }
    }
}

#[test]
fn host_topology_works() {
    let t = Topology::host().expect("host topology");
    assert!(t.node_count() >= 1);
    assert!(matches!(t.source, TopologySource::Host));
    assert!(!t.is_emulated());
    assert_eq!(t.host_nodes, t.node_count());
    assert_eq!(t.host_cpus, t.cpu_count());
    assert!(t.cpu_count() >= 1);
    for n in &t.nodes {
        assert_eq!(n.host_node, n.os_index, "identity mapping");
        let as_usize: Vec<usize> = n.cpus.iter().map(|&c| c as usize).collect();
        assert_eq!(n.host_cpus, as_usize, "identity mapping");
    }
    for i in 0..t.node_count() {
        assert_eq!(t.distance(i, i), 10);
    }
    let text = t.render_text();
    assert!(text.contains("host"), "{text}");
}

#[test]
fn mapping_onto_a_bigger_host_is_round_robin() {
    // A made-up 2-node, 4-CPU host: the 4-node fixture's nodes 0 and 2 go to
    // host node 0, nodes 1 and 3 to host node 1, and the 16 CPUs of each
    // fixture node are spread evenly over the two CPUs of its host node.
    let host = HostView {
        nodes: vec![
            HostNode {
                os_index: 0,
                cpus: vec![0, 1],
                memory_bytes: 1 << 30,
            },
            HostNode {
                os_index: 1,
                cpus: vec![2, 3],
                memory_bytes: 1 << 30,
            },
        ],
    };
    let mut t = Topology::from_fixture_name("4-node").unwrap();
    t.map_onto(&host).unwrap();
    check_mapping(&t, &host, "4-node on 2-node host");
    assert_eq!(
        t.nodes.iter().map(|n| n.host_node).collect::<Vec<_>>(),
        [0, 1, 0, 1]
    );
    for n in &t.nodes {
        assert_eq!(
            n.host_cpus.len(),
            2,
            "node {} uses both CPUs of its host node",
            n.index
        );
        let on_first = (0..n.cpus.len())
            .filter(|&k| n.host_cpu_for(k) == Some(n.host_cpus[0]))
            .count();
        assert_eq!(
            on_first * 2,
            n.cpus.len(),
            "even spread on node {}",
            n.index
        );
    }

    // Round-robin continues across fixture nodes sharing a host node: with
    // one host node of 3 CPUs, the 2-socket fixture's second node starts
    // where the first one (32 CPUs: 32 mod 3 = 2) stopped.
    let host3 = HostView {
        nodes: vec![HostNode {
            os_index: 0,
            cpus: vec![4, 5, 6],
            memory_bytes: 1 << 30,
        }],
    };
    let mut t = Topology::from_fixture_name("2-socket").unwrap();
    t.map_onto(&host3).unwrap();
    check_mapping(&t, &host3, "2-socket on 3-CPU host");
    assert!(t.is_emulated());
    assert_eq!(t.nodes[0].host_cpus, [4, 5, 6]);
    assert_eq!(t.nodes[1].host_cpus, [6, 4, 5]);
    assert!(t.is_emulated());

    // A host as big as the fixture: one-to-one, not emulated.
    let host = HostView {
        nodes: (0..2)
            .map(|h| HostNode {
                os_index: h,
                cpus: (h as usize * 32..h as usize * 32 + 32).collect(),
                memory_bytes: 64 << 30,
            })
            .collect(),
    };
    let mut t = Topology::from_fixture_name("2-socket").unwrap();
    t.map_onto(&host).unwrap();
    check_mapping(&t, &host, "2-socket on 2-socket host");
    assert!(!t.is_emulated());
    assert!(
        t.render_text().contains("Not emulated"),
        "{}",
        t.render_text()
    );
}

#[test]
fn render_text_reports_nodes_distances_and_emulation() {
    let t = Topology::from_fixture_name("8-node").unwrap();
    let text = t.render_text();
    for needle in [
        "8-node",
        "node 7",
        "32",
        "host node",
        "host CPU",
        "distance",
    ] {
        assert!(
            text.to_lowercase().contains(&needle.to_lowercase()),
            "{needle:?} in:\n{text}"
        );
    }
    assert!(t.is_emulated(), "8 nodes on this host are emulated");
    assert!(text.contains("Emulated"), "{text}");
    assert!(text.contains("32.0 GiB"), "{text}");
}

#[test]
fn missing_distance_matrix_falls_back_to_10_20() {
    // Strip the <distances2> element from a fixture.
    let xml = std::fs::read_to_string(fixture_path("2-socket")).unwrap();
    let start = xml.find("<distances2").unwrap();
    let end = xml.find("</distances2>").unwrap() + "</distances2>".len();
    let stripped = format!("{}{}", &xml[..start], &xml[end..]);
    let dir = tempdir("nodist");
    let path = dir.join("no-distances.xml");
    std::fs::write(&path, &stripped).unwrap();
    let t = Topology::from_xml_file(&path).unwrap();
    check_against_xml(&t, &stripped, "2-socket without distances");
    assert_eq!(t.distance_origin, DistanceOrigin::Default);
    assert_eq!(t.distances, vec![vec![10, 20], vec![20, 10]]);
    let text = t.render_text();
    assert!(text.contains("no NUMA distance matrix"), "{text}");

    // Synthetic topologies have no matrix either.
    let s = Topology::from_synthetic("pack:2 [numa(memory=1GiB)] core:2 pu:1").unwrap();
    assert_eq!(s.node_count(), 2);
    assert_eq!(s.distance(0, 1), 20);
    assert_eq!(s.nodes[1].memory_bytes, 1 << 30);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("disco-topology-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn malformed_xml_error_names_the_file() {
    let dir = tempdir("bad");
    let cases: &[(&str, &str)] = &[
        ("garbage.xml", "this is not xml at all"),
        ("truncated.xml", "<?xml version=\"1.0\"?>\n<topology version=\"2.0\">\n  <object type=\"Machine\" os_index=\"0\" cpuset=\"0x1\""),
        ("empty.xml", ""),
        ("other.xml", "<?xml version=\"1.0\"?>\n<html><body>hello</body></html>\n"),
    ];
    for (file, content) in cases {
        let path = dir.join(file);
        std::fs::write(&path, content).unwrap();
        let err = Topology::from_xml_file(&path).expect_err(file);
        let msg = format!("{err:#}");
        assert!(msg.contains(&path.display().to_string()), "{file}: {msg}");
        assert!(msg.contains("not a valid hwloc XML"), "{file}: {msg}");
    }
}

#[test]
fn xml_without_numa_nodes_is_rejected() {
    // The 2-socket fixture with its NUMANode objects and distances removed.
    let xml = std::fs::read_to_string(fixture_path("2-socket")).unwrap();
    let mut out = String::new();
    let mut skip = 0usize;
    for line in xml.lines() {
        if skip > 0 {
            if line.trim_start().starts_with("</object>") {
                skip -= 1;
            }
            continue;
        }
        if line.contains(r#"<object type="NUMANode""#) {
            if !line.trim_end().ends_with("/>") {
                skip = 1;
            }
            continue;
        }
        if line.contains("<distances2")
            || line.contains("distances2>")
            || line.contains("<indexes")
            || line.contains("<u64values")
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(!out.contains("NUMANode"));
    let dir = tempdir("nonuma");
    let path = dir.join("no-numa.xml");
    std::fs::write(&path, &out).unwrap();
    let err = Topology::from_xml_file(&path).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("has no NUMA nodes"), "{msg}");
}

#[test]
fn negative_or_absurd_node_memory_is_rejected_naming_file_and_attribute() {
    let xml = std::fs::read_to_string(fixture_path("2-socket")).unwrap();
    let first = attr(tags(&xml, "<object type=\"NUMANode\"")[0], "local_memory")
        .unwrap()
        .to_string();
    let dir = tempdir("memory");
    // hwloc reads "-5" as 2^64 - 5; 2^60 is more than x86-64 can address.
    for (tag, value) in [("negative", "-5"), ("huge", "1152921504606846976")] {
        let path = dir.join(format!("{tag}.xml"));
        std::fs::write(
            &path,
            xml.replacen(
                &format!("local_memory=\"{first}\""),
                &format!("local_memory=\"{value}\""),
                1,
            ),
        )
        .unwrap();
        let msg = format!("{:#}", Topology::from_xml_file(&path).unwrap_err());
        for part in [
            path.display().to_string().as_str(),
            "attribute `local_memory`",
            "not a memory size",
            "allowed: 0 to 4503599627370496 bytes",
        ] {
            assert!(msg.contains(part), "{tag}: expected `{part}` in: {msg}");
        }
    }
}

#[test]
fn a_topology_file_that_would_hang_or_exhaust_is_refused() {
    let dir = tempdir("special");
    let fifo = dir.join("fifo.xml");
    common::mkfifo(&fifo);
    let big = dir.join("big.xml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(disco::files::MAX_TOPOLOGY_BYTES + 1)
        .unwrap();
    for (path, expect) in [
        (
            fifo.as_path(),
            "is a FIFO (named pipe); allowed: a regular file",
        ),
        (
            Path::new("/dev/zero"),
            "is a character device; allowed: a regular file",
        ),
        (big.as_path(), "allowed: at most 16.0 MiB"),
    ] {
        let p = path.to_path_buf();
        let msg = common::within(&format!("loading {}", path.display()), move || {
            format!("{:#}", Topology::from_xml_file(&p).unwrap_err())
        });
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(expect), "expected `{expect}` in: {msg}");
    }
}

#[test]
fn missing_file_error_names_the_file() {
    let path = Path::new("topology-fixtures/does-not-exist.xml");
    let err = Topology::from_xml_file(path).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("topology-fixtures/does-not-exist.xml"),
        "{msg}"
    );
}

#[test]
fn unknown_fixture_name_lists_the_valid_ones() {
    let err = Topology::from_fixture_name("16-node").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("16-node") && msg.contains("2-socket"), "{msg}");
    // ".xml" suffix is accepted.
    assert_eq!(
        Topology::from_fixture_name("4-node.xml")
            .unwrap()
            .node_count(),
        4
    );
}

#[test]
fn serializes_to_json() {
    let t = Topology::from_fixture_name("2-socket").unwrap();
    let v = serde_json::to_value(&t).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(v["distances"][0][1], 21);
}
