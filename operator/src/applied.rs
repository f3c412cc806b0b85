//! What the reconciler last applied for each pipeline's *supporting* objects (ServiceAccount,
//! ConfigMap, Service, PodDisruptionBudgets), so that a reconcile whose desired objects are
//! unchanged skips those server-side applies. Deployments are always applied: their apply
//! response carries the status the reconcile reports, and it corrects drift.
//!
//! An entry is trusted only while nothing else touched the objects it covers: the owned-object
//! watches report every change, and a change whose `resourceVersion` is not the one our own
//! apply returned (someone edited or deleted the object) drops the entry, so the next reconcile
//! applies everything again. Entries also expire (`max_age`, 10 minutes by default), which bounds how
//! long any drift the watches could not attribute may last.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use serde::Serialize;

/// `(namespace, pipeline name)`.
type PipelineKey = (String, String);
/// `(kind, object name)`.
type ObjectKey = (&'static str, String);

#[derive(Debug)]
struct Entry {
    fingerprint: u64,
    versions: HashMap<ObjectKey, String>,
    at: Instant,
}

/// Per-pipeline record of the last successful apply of the supporting objects.
#[derive(Debug)]
pub struct Applied {
    entries: HashMap<PipelineKey, Entry>,
    max_age: Duration,
}

impl Default for Applied {
    fn default() -> Self {
        Self::new(Duration::from_secs(600))
    }
}

impl Applied {
    /// An empty record whose entries are trusted for at most `max_age`.
    pub fn new(max_age: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            max_age,
        }
    }

    /// Whether the objects with this `fingerprint` were applied for the pipeline, untouched
    /// since, less than `max_age` before `now`.
    pub fn is_current(&self, ns: &str, pipeline: &str, fingerprint: u64, now: Instant) -> bool {
        self.entries
            .get(&(ns.to_owned(), pipeline.to_owned()))
            .is_some_and(|e| {
                e.fingerprint == fingerprint && now.saturating_duration_since(e.at) < self.max_age
            })
    }

    /// Records a successful apply: the fingerprint of what was applied and the
    /// `resourceVersion` each object had in the apply response.
    pub fn record(
        &mut self,
        ns: &str,
        pipeline: &str,
        fingerprint: u64,
        versions: impl IntoIterator<Item = (&'static str, String, String)>,
        now: Instant,
    ) {
        let versions = versions
            .into_iter()
            .map(|(kind, name, rv)| ((kind, name), rv))
            .collect();
        self.entries.insert(
            (ns.to_owned(), pipeline.to_owned()),
            Entry {
                fingerprint,
                versions,
                at: now,
            },
        );
    }

    /// A watch event for an owned object of `pipeline`: a deletion, or a version other than the
    /// one recorded, means someone else changed it, and the pipeline's entry is dropped.
    /// Objects the entry does not cover, and the echo of our own apply, change nothing.
    pub fn observe(
        &mut self,
        ns: &str,
        pipeline: &str,
        kind: &'static str,
        name: &str,
        resource_version: Option<&str>,
        deleted: bool,
    ) {
        let key = (ns.to_owned(), pipeline.to_owned());
        let Some(entry) = self.entries.get(&key) else {
            return;
        };
        let Some(ours) = entry.versions.get(&(kind, name.to_owned())) else {
            return;
        };
        if deleted || resource_version != Some(ours.as_str()) {
            self.entries.remove(&key);
        }
    }

    /// Drops the pipeline's entry (e.g. after a failed apply).
    pub fn forget(&mut self, ns: &str, pipeline: &str) {
        self.entries.remove(&(ns.to_owned(), pipeline.to_owned()));
    }
}

/// A fingerprint of objects as they would be sent (their JSON, in order), stable within one
/// process.
pub fn fingerprint<'a>(objects: impl IntoIterator<Item = &'a dyn Json>) -> Option<u64> {
    let mut h = DefaultHasher::new();
    for o in objects {
        o.json()?.hash(&mut h);
    }
    Some(h.finish())
}

/// An object that can be fingerprinted: anything serializable.
pub trait Json {
    /// Its JSON bytes, `None` if it cannot be serialized.
    fn json(&self) -> Option<Vec<u8>>;
}

impl<T: Serialize> Json for T {
    fn json(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(at: Instant) -> Applied {
        let mut a = Applied::new(Duration::from_secs(600));
        a.record(
            "ml",
            "text",
            7,
            [
                ("ConfigMap", "text-config".to_owned(), "100".to_owned()),
                ("Service", "text".to_owned(), "101".to_owned()),
            ],
            at,
        );
        a
    }

    #[test]
    fn an_unchanged_fingerprint_is_current_until_the_entry_expires() {
        let t = Instant::now();
        let a = recorded(t);
        assert!(a.is_current("ml", "text", 7, t + Duration::from_secs(599)));
        assert!(!a.is_current("ml", "text", 7, t + Duration::from_secs(600)));
    }

    #[test]
    fn a_different_fingerprint_or_another_pipeline_is_not_current() {
        let t = Instant::now();
        let a = recorded(t);
        assert!(!a.is_current("ml", "text", 8, t));
        assert!(!a.is_current("ml", "image", 7, t));
        assert!(!a.is_current("other", "text", 7, t));
    }

    #[test]
    fn the_echo_of_our_own_apply_keeps_the_entry() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "text", "ConfigMap", "text-config", Some("100"), false);
        assert!(a.is_current("ml", "text", 7, t));
    }

    #[test]
    fn someone_elses_edit_of_a_covered_object_drops_the_entry() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "text", "Service", "text", Some("205"), false);
        assert!(!a.is_current("ml", "text", 7, t));
    }

    #[test]
    fn deleting_a_covered_object_drops_the_entry() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "text", "ConfigMap", "text-config", Some("100"), true);
        assert!(!a.is_current("ml", "text", 7, t));
    }

    #[test]
    fn events_for_objects_the_entry_does_not_cover_change_nothing() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe(
            "ml",
            "text",
            "ServiceAccount",
            "text-worker",
            Some("1"),
            true,
        );
        a.observe("ml", "image", "Service", "text", Some("999"), false);
        a.observe("ml", "text", "ConfigMap", "another", Some("3"), false);
        assert!(a.is_current("ml", "text", 7, t));
    }

    #[test]
    fn forget_drops_the_entry() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.forget("ml", "text");
        assert!(!a.is_current("ml", "text", 7, t));
    }

    #[test]
    fn the_fingerprint_follows_the_content_and_the_order() {
        let a = serde_json::json!({"data": {"pipeline.yaml": "a"}});
        let b = serde_json::json!({"data": {"pipeline.yaml": "b"}});
        let fp = |objects: [&serde_json::Value; 2]| {
            fingerprint(objects.iter().map(|o| *o as &dyn Json)).expect("json")
        };
        let fa = fp([&a, &b]);
        assert_eq!(fa, fp([&a, &b]));
        assert_ne!(fa, fp([&b, &a]));
        assert_ne!(fa, fp([&a, &a]));
    }
}
