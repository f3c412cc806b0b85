//! Watch caches: the newest copy (or summary) of each watched object, keyed by
//! `namespace/name`.
//!
//! What kube-rs' reflector `Store` does, in less memory: its key is an `ObjectRef` (about
//! 100 bytes inline plus two or more strings of its own, the kind's type info and UID
//! included), once per cached object and again in the table's spare slots. Here the key is
//! one boxed `namespace/name` string, the form the work queue's keys take as well
//! (`controller::Key`). At 1,000 pipelines the operator caches ~4,000 objects (pipelines,
//! Deployments, pods). Like the reflector, a relist is collected apart and swapped in whole
//! when it completes, so readers never see half a list and objects deleted while the watch
//! was down disappear.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use kube::Resource;
use kube::runtime::watcher;

/// A shared watch cache; clones read and write the same objects.
#[derive(Debug)]
pub struct Cache<V> {
    shared: Arc<RwLock<Tables<V>>>,
    /// Whether a first list has completed.
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            shared: Arc::new(RwLock::new(Tables {
                live: HashMap::new(),
                relist: None,
            })),
            ready: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

#[derive(Debug)]
struct Tables<V> {
    /// What readers see.
    live: HashMap<Box<str>, Arc<V>>,
    /// A list in progress (between `Init` and `InitDone`).
    relist: Option<HashMap<Box<str>, Arc<V>>>,
}

/// The cache key of an object: `namespace/name` (`/name` for one without a namespace).
pub fn key_of(namespace: &str, name: &str) -> Box<str> {
    let mut key = String::with_capacity(namespace.len() + 1 + name.len());
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
    key.into_boxed_str()
}

impl<V> Cache<V> {
    /// The object named `name` in `namespace`, if cached.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<V>> {
        self.get_key(&key_of(namespace, name))
    }

    /// The object with cache key `key` (`namespace/name`), if cached.
    pub fn get_key(&self, key: &str) -> Option<Arc<V>> {
        self.read().live.get(key).cloned()
    }

    /// Every cached object, in no particular order.
    pub fn state(&self) -> Vec<Arc<V>> {
        self.read().live.values().cloned().collect()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.read().live.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.read().live.is_empty()
    }

    /// Takes in one watch event, keeping `summarise(object)` (`Clone::clone` to keep the
    /// object whole).
    pub fn apply<K: Resource>(&self, event: &watcher::Event<K>, summarise: impl Fn(&K) -> V) {
        let mut t = self.shared.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(o) => {
                if let Some(key) = key(o) {
                    t.live.insert(key, Arc::new(summarise(o)));
                }
            }
            watcher::Event::Delete(o) => {
                if let Some(key) = key(o) {
                    t.live.remove(&key);
                }
            }
            watcher::Event::Init => t.relist = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                if let Some(key) = key(o) {
                    let tables = &mut *t;
                    tables
                        .relist
                        .as_mut()
                        .unwrap_or(&mut tables.live)
                        .insert(key, Arc::new(summarise(o)));
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = t.relist.take() {
                    t.live = listed;
                }
                drop(t);
                self.ready.send_replace(true);
            }
        }
    }

    /// Returns once the cache holds a complete list (until then it is empty, or holds the
    /// list before a relist). Any number of tasks may wait.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // Never fails: the sender lives as long as this cache.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Takes a watch stream's events into this cache, as [`Cache::apply`] does:
    /// `stream.inspect(cache.writer(summarise))`, so that an event is cached before anything
    /// downstream of it sees it.
    pub fn writer<K: Resource + 'static>(
        &self,
        summarise: fn(&K) -> V,
    ) -> impl Fn(&Result<watcher::Event<K>, watcher::Error>) + Send + Sync + 'static + use<K, V>
    where
        V: Send + Sync + 'static,
    {
        let cache = self.clone();
        move |event| {
            if let Ok(event) = event {
                cache.apply(event, summarise);
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables<V>> {
        self.shared.read().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key<V: Resource>(o: &V) -> Option<Box<str>> {
    let meta = o.meta();
    Some(key_of(
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref()?,
    ))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(ns: &str, name: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some([("v".to_string(), value.to_string())].into()),
            ..ConfigMap::default()
        }
    }

    fn value(c: &Cache<ConfigMap>, ns: &str, name: &str) -> Option<String> {
        c.get(ns, name)?.data.as_ref()?.get("v").cloned()
    }

    #[test]
    fn applies_replace_and_deletes_remove_by_namespace_and_name() {
        let c = Cache::default();
        c.apply(&watcher::Event::Apply(cm("a", "x", "1")), Clone::clone);
        c.apply(&watcher::Event::Apply(cm("b", "x", "2")), Clone::clone);
        c.apply(&watcher::Event::Apply(cm("a", "x", "3")), Clone::clone);
        assert_eq!(value(&c, "a", "x").as_deref(), Some("3"));
        assert_eq!(value(&c, "b", "x").as_deref(), Some("2"));
        assert_eq!(c.len(), 2);
        assert!(c.get_key("a/x").is_some());
        c.apply(&watcher::Event::Delete(cm("a", "x", "3")), Clone::clone);
        assert_eq!(c.get("a", "x"), None);
        assert_eq!(c.state().len(), 1);
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_done_and_drops_what_it_did_not_list() {
        let c = Cache::default();
        c.apply(&watcher::Event::Apply(cm("a", "gone", "1")), Clone::clone);
        c.apply(&watcher::Event::Apply(cm("a", "kept", "1")), Clone::clone);
        c.apply(&watcher::Event::Init, ConfigMap::clone);
        c.apply(
            &watcher::Event::InitApply(cm("a", "kept", "2")),
            Clone::clone,
        );
        c.apply(
            &watcher::Event::InitApply(cm("a", "new", "1")),
            Clone::clone,
        );
        // Mid-list, readers still see the previous state.
        assert_eq!(value(&c, "a", "kept").as_deref(), Some("1"));
        assert!(c.get("a", "gone").is_some());
        assert!(c.get("a", "new").is_none());
        c.apply(&watcher::Event::InitDone, ConfigMap::clone);
        assert_eq!(value(&c, "a", "kept").as_deref(), Some("2"));
        assert!(c.get("a", "gone").is_none());
        assert!(c.get("a", "new").is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn clones_share_one_cache_and_an_object_without_a_name_is_not_cached() {
        let c = Cache::default();
        let reader = c.clone();
        c.apply(&watcher::Event::Apply(cm("a", "x", "1")), Clone::clone);
        assert_eq!(value(&reader, "a", "x").as_deref(), Some("1"));
        let mut nameless = cm("a", "x", "1");
        nameless.metadata.name = None;
        c.apply(&watcher::Event::Apply(nameless), Clone::clone);
        assert_eq!(reader.len(), 1);
    }

    #[tokio::test]
    async fn waiters_wake_when_the_first_list_completes() {
        let c = Cache::<ConfigMap>::default();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.wait_until_ready().await })
            })
            .collect();
        c.apply(&watcher::Event::Init, ConfigMap::clone);
        c.apply(&watcher::Event::InitApply(cm("a", "x", "1")), Clone::clone);
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        c.apply(&watcher::Event::InitDone, ConfigMap::clone);
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(10), w)
                .await
                .expect("woken")
                .unwrap();
        }
        // Later waiters return at once.
        c.wait_until_ready().await;
    }

    #[test]
    fn a_summarising_cache_keeps_only_the_summary_under_the_objects_key() {
        let c = Cache::<String>::default();
        let summarise = |o: &ConfigMap| {
            o.data
                .as_ref()
                .and_then(|d| d.get("v"))
                .cloned()
                .unwrap_or_default()
        };
        c.apply(&watcher::Event::Apply(cm("a", "x", "1")), summarise);
        c.apply(&watcher::Event::Apply(cm("a", "x", "2")), summarise);
        assert_eq!(c.get("a", "x").as_deref().map(String::as_str), Some("2"));
        c.apply(&watcher::Event::Delete(cm("a", "x", "2")), summarise);
        assert!(c.is_empty());
    }

    #[test]
    fn keys_are_namespace_slash_name() {
        assert_eq!(&*key_of("ml", "embed"), "ml/embed");
        assert_eq!(&*key_of("", "node-1"), "/node-1");
    }
}
