//! Root-only: the bookinfo demo end to end, as `cargo xtask demo --no-wait` runs it (without
//! the setup step): real agents on a 2-node testbed, curl from the sleep pod, round-robin over
//! the three reviews versions, the agents' counters, and a complete teardown.
//!
//! Also, without root: the bookkeeping behind the demo's verdict. xtask is a binary crate, so
//! the demo's modules are compiled into this test directly.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../src/util.rs"]
mod util;

#[allow(dead_code)]
#[path = "../src/demo/report.rs"]
mod report;

#[allow(dead_code)]
#[path = "../src/demo/bookinfo.rs"]
mod bookinfo;

#[allow(dead_code)]
#[path = "../src/demo/prom.rs"]
mod prom;

#[allow(dead_code)]
#[path = "../src/demo/traces.rs"]
mod traces;

use std::path::Path;

use mesh_testbed::{STATE_ROOT, require_root};
use report::Traffic;

#[test]
fn demo_sends_bookinfo_traffic_through_the_mesh_and_cleans_up() {
    if !require_root("demo_sends_bookinfo_traffic_through_the_mesh_and_cleans_up") {
        return;
    }
    let (agent_bin, testapp_bin) = bookinfo::build_bins().unwrap();
    let outcome = bookinfo::run(&bookinfo::Options {
        agent_bin,
        testapp_bin,
        requests: 12,
        wait: false,
    })
    .unwrap();
    let t = &outcome.traffic;
    t.check().unwrap();
    assert_eq!(t.requests, 12 + bookinfo::JASON_REQUESTS);
    // The routing rules: jason's requests all reach v2, the others split over v1 and v3.
    assert_eq!(
        t.jason.get("v2"),
        Some(&bookinfo::JASON_REQUESTS),
        "{:?}",
        t.jason
    );
    let v1 = t.reviews.get("v1").copied().unwrap_or(0);
    let v3 = t.reviews.get("v3").copied().unwrap_or(0);
    assert_eq!(v1 + v3, 12, "{:?}", t.reviews);
    // reviews-v2 and v3 call ratings, v1 does not.
    assert_eq!(t.ratings_calls, v3 + bookinfo::JASON_REQUESTS);

    // Nothing of the testbed is left.
    let prefix = &outcome.prefix;
    assert!(!Path::new(STATE_ROOT).join(prefix).exists());
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "{netns}"
    );
    let bpffs = std::fs::read_dir("/sys/fs/bpf").unwrap();
    for e in bpffs {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(&format!("nodemesh-{prefix}-")), "{name}");
    }
    let cgroup = mesh_testbed::cgroup2_mount().unwrap().join(prefix);
    assert!(!cgroup.exists(), "{}", cgroup.display());
}

// The bookkeeping behind the demo's verdict (no root needed).

fn answer(reviews: &str, ratings_status: Option<u16>) -> String {
    let ratings = match ratings_status {
        Some(s) => format!(r#"[{{"name":"ratings","status":{s},"body":{{"calls":[]}}}}]"#),
        None => "[]".into(),
    };
    format!(
        r#"{{"service":"productpage","version":"v1","calls":[
            {{"name":"details","status":200,"body":{{"calls":[]}}}},
            {{"name":"reviews","status":200,"body":{{"version":"{reviews}","calls":{ratings}}}}}]}}"#
    )
}

#[test]
fn counts_versions_and_prefers_a_sample_with_ratings() {
    let mut t = Traffic::default();
    t.record(1, 200, &answer("v1", None), None);
    t.record(2, 200, &answer("v2", Some(200)), Some("jason"));
    t.record(3, 200, &answer("v3", Some(200)), None);
    assert_eq!(t.requests, 3);
    assert_eq!(t.ratings_calls, 2);
    assert_eq!(t.order, ["v1", "v2", "v3"]);
    assert_eq!(t.jason.get("v2"), Some(&1));
    assert_eq!(
        t.sample.as_ref().unwrap()["calls"][1]["body"]["version"],
        "v2"
    );
    t.check().unwrap();
    // A broken trace (spans missing at the collector) fails the demo.
    t.longest_trace = Some(8);
    t.check().unwrap();
    t.longest_trace = Some(4);
    let err = t.check().unwrap_err().to_string();
    assert!(err.contains("has 4 spans"), "{err}");
}

#[test]
fn failures_and_missing_versions_fail_the_check() {
    let mut t = Traffic::default();
    t.record(1, 200, &answer("v1", None), None);
    t.record(2, 200, &answer("v2", Some(200)), Some("jason"));
    let err = t.check().unwrap_err().to_string();
    assert!(err.contains("reviews v3 never answered"), "{err}");
    // Against the rules: v2 for a request without an end-user.
    let mut wrong = Traffic::default();
    wrong.record(1, 200, &answer("v2", Some(200)), None);
    let err = wrong.check().unwrap_err().to_string();
    assert!(
        err.contains("reviews v2 answered 1 requests without an end-user"),
        "{err}"
    );

    t.record(3, 200, &answer("v3", Some(0)), None);
    t.record(4, 503, "no healthy upstream", None);
    t.fail(5, "curl failed".into());
    assert_eq!(t.requests, 5);
    assert_eq!(t.order, ["v1", "v2", "-", "-", "-"]);
    let err = t.check().unwrap_err().to_string();
    assert!(err.starts_with("3 of 5 requests failed"), "{err}");
    assert!(
        err.contains("request 3: productpage -> reviews -> ratings failed"),
        "{err}"
    );
}
