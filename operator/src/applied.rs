//! What the reconciler last applied of each owned object (ServiceAccount, ConfigMap, Service,
//! Deployments, PodDisruptionBudgets), so that a reconcile applies only the objects whose
//! desired state changed. A reconcile with nothing changed makes no server-side apply at all
//! and reads the Deployments' status from the watch cache instead.
//!
//! A record is trusted only while nothing else touched its object: the owned-object watches
//! report every change, and a change whose marker is not the one our own apply returned
//! (someone edited or deleted the object) drops the record, so the next reconcile applies the
//! object again. The marker is the `resourceVersion`, except for kinds whose status other
//! controllers rewrite (Deployments, PodDisruptionBudgets), where it is the `generation`: a spec
//! edit by anyone else still drops the record, a status update does not. Records also expire
//! (`max_age`, 10 minutes by default), which bounds how long drift the watches cannot attribute
//! (a label edit on a Deployment, say) may last.
//!
//! Objects are identified by namespace, kind and name, stored as one 64-bit hash, and markers
//! and desired states as hashes too: a record is 32 bytes whatever the object's size.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
struct Record {
    fingerprint: u64,
    marker: u64,
    at: Instant,
}

/// Records of the last successful apply of each owned object.
#[derive(Debug)]
pub struct Applied {
    records: HashMap<u64, Record>,
    max_age: Duration,
    /// Expired records are swept when the map has grown past this size.
    sweep_at: usize,
}

impl Default for Applied {
    fn default() -> Self {
        Self::new(Duration::from_secs(600))
    }
}

/// Minimum map size before expired records are swept.
const MIN_SWEEP: usize = 1024;

impl Applied {
    /// An empty record whose entries are trusted for at most `max_age`.
    pub fn new(max_age: Duration) -> Self {
        Self {
            records: HashMap::new(),
            max_age,
            sweep_at: MIN_SWEEP,
        }
    }

    /// The marker our last apply of this object returned, if that apply sent exactly
    /// `fingerprint`, nobody changed the object since, and it was less than `max_age` before
    /// `now`. `None` means: apply it.
    pub fn current(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
        fingerprint: u64,
        now: Instant,
    ) -> Option<u64> {
        self.records
            .get(&key(ns, kind, name))
            .filter(|r| {
                r.fingerprint == fingerprint && now.saturating_duration_since(r.at) < self.max_age
            })
            .map(|r| r.marker)
    }

    /// Records a successful apply of `fingerprint`, whose response carried `marker`.
    pub fn record(
        &mut self,
        ns: &str,
        kind: &str,
        name: &str,
        fingerprint: u64,
        marker: &str,
        now: Instant,
    ) {
        self.records.insert(
            key(ns, kind, name),
            Record {
                fingerprint,
                marker: hash(marker),
                at: now,
            },
        );
        if self.records.len() >= self.sweep_at {
            let max_age = self.max_age;
            self.records
                .retain(|_, r| now.saturating_duration_since(r.at) < max_age);
            self.sweep_at = (self.records.len() * 2).max(MIN_SWEEP);
        }
    }

    /// A watch event for an owned object: a deletion, or a marker other than the recorded one,
    /// means someone else changed it, and its record is dropped. The echo of our own apply, and
    /// objects without a record, change nothing.
    pub fn observe(
        &mut self,
        ns: &str,
        kind: &str,
        name: &str,
        marker: Option<&str>,
        deleted: bool,
    ) {
        let k = key(ns, kind, name);
        let Some(r) = self.records.get(&k) else {
            return;
        };
        if deleted || marker.map(hash) != Some(r.marker) {
            self.records.remove(&k);
        }
    }

    /// Drops the object's record (e.g. after a failed apply).
    pub fn forget(&mut self, ns: &str, kind: &str, name: &str) {
        self.records.remove(&key(ns, kind, name));
    }

    /// Whether the marker an object has now is the one recorded by [`Applied::current`].
    pub fn is_marker(recorded: u64, marker: &str) -> bool {
        hash(marker) == recorded
    }

    /// Number of records held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }
}

fn key(ns: &str, kind: &str, name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (ns, kind, name).hash(&mut h);
    h.finish()
}

fn hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// A fingerprint of an object as it would be sent (its JSON), stable within one process.
/// `None` if it cannot be serialized.
pub fn fingerprint<T: Serialize>(object: &T) -> Option<u64> {
    let json = serde_json::to_vec(object).ok()?;
    let mut h = DefaultHasher::new();
    json.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(at: Instant) -> Applied {
        let mut a = Applied::new(Duration::from_secs(600));
        a.record("ml", "ConfigMap", "text-config", 7, "100", at);
        a.record("ml", "Deployment", "text-preprocess", 9, "g3", at);
        a
    }

    #[test]
    fn an_unchanged_fingerprint_is_current_until_the_record_expires() {
        let t = Instant::now();
        let a = recorded(t);
        let marker = a.current(
            "ml",
            "ConfigMap",
            "text-config",
            7,
            t + Duration::from_secs(599),
        );
        assert!(marker.is_some_and(|m| Applied::is_marker(m, "100")));
        assert_eq!(
            a.current(
                "ml",
                "ConfigMap",
                "text-config",
                7,
                t + Duration::from_secs(600)
            ),
            None
        );
    }

    #[test]
    fn a_different_fingerprint_name_kind_or_namespace_is_not_current() {
        let t = Instant::now();
        let a = recorded(t);
        assert_eq!(a.current("ml", "ConfigMap", "text-config", 8, t), None);
        assert_eq!(a.current("ml", "ConfigMap", "image-config", 7, t), None);
        assert_eq!(a.current("ml", "Service", "text-config", 7, t), None);
        assert_eq!(a.current("other", "ConfigMap", "text-config", 7, t), None);
    }

    #[test]
    fn the_recorded_marker_is_told_apart_from_a_newer_one() {
        let t = Instant::now();
        let a = recorded(t);
        let m = a
            .current("ml", "Deployment", "text-preprocess", 9, t)
            .expect("recorded");
        assert!(Applied::is_marker(m, "g3"));
        assert!(!Applied::is_marker(m, "g4"));
    }

    #[test]
    fn the_echo_of_our_own_apply_keeps_the_record() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "ConfigMap", "text-config", Some("100"), false);
        assert!(a.current("ml", "ConfigMap", "text-config", 7, t).is_some());
    }

    #[test]
    fn someone_elses_edit_drops_that_objects_record_only() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "ConfigMap", "text-config", Some("205"), false);
        assert_eq!(a.current("ml", "ConfigMap", "text-config", 7, t), None);
        assert!(
            a.current("ml", "Deployment", "text-preprocess", 9, t)
                .is_some()
        );
    }

    #[test]
    fn an_event_without_a_marker_drops_the_record() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "Deployment", "text-preprocess", None, false);
        assert_eq!(a.current("ml", "Deployment", "text-preprocess", 9, t), None);
    }

    #[test]
    fn deleting_an_object_drops_its_record() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "ConfigMap", "text-config", Some("100"), true);
        assert_eq!(a.current("ml", "ConfigMap", "text-config", 7, t), None);
    }

    #[test]
    fn events_for_objects_without_a_record_change_nothing() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.observe("ml", "ServiceAccount", "text-worker", Some("1"), true);
        a.observe("other", "ConfigMap", "text-config", Some("999"), false);
        a.observe("ml", "ConfigMap", "another", Some("3"), false);
        assert!(a.current("ml", "ConfigMap", "text-config", 7, t).is_some());
        assert!(
            a.current("ml", "Deployment", "text-preprocess", 9, t)
                .is_some()
        );
    }

    #[test]
    fn forget_drops_the_record() {
        let t = Instant::now();
        let mut a = recorded(t);
        a.forget("ml", "ConfigMap", "text-config");
        assert_eq!(a.current("ml", "ConfigMap", "text-config", 7, t), None);
    }

    #[test]
    fn expired_records_are_swept_once_the_map_grows() {
        let t = Instant::now();
        let mut a = Applied::new(Duration::from_secs(600));
        for i in 0..MIN_SWEEP - 1 {
            a.record("ml", "ConfigMap", &format!("old-{i}"), 1, "1", t);
        }
        assert_eq!(a.len(), MIN_SWEEP - 1);
        let later = t + Duration::from_secs(601);
        a.record("ml", "ConfigMap", "new", 1, "1", later);
        assert_eq!(a.len(), 1);
        assert!(a.current("ml", "ConfigMap", "new", 1, later).is_some());
    }

    #[test]
    fn the_fingerprint_follows_the_content() {
        let a = serde_json::json!({"data": {"pipeline.yaml": "a"}});
        let b = serde_json::json!({"data": {"pipeline.yaml": "b"}});
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}
