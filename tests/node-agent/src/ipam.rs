//! Pod IP allocation from the bridge's subnet, persisted in the state dir so a restarted agent
//! never hands out an address that a live pod still holds.
//!
//! The core ([`Allocator`]) is pure; [`Allocator::load`] / [`Allocator::save`] are the file edge.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Allocation failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every address of the subnet is taken.
    #[error("no free pod IP left in {0}")]
    Exhausted(String),
    /// The state file could not be read or written.
    #[error("ipam state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("ipam state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The subnet string is not `a.b.c.d/len`.
    #[error("invalid subnet {0:?}: expected a.b.c.d/len with len 8..=30")]
    BadSubnet(String),
}

/// An IPv4 subnet with the gateway address (the bridge's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The gateway (bridge) address, as given in `--bridge-address`.
    pub gateway: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `10.244.0.1/16`.
    pub fn parse(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadSubnet(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let gateway: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        Ok(Self { gateway, prefix })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The network address.
    pub fn network(&self) -> u32 {
        u32::from(self.gateway) & self.mask()
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> u32 {
        self.network() | !self.mask()
    }

    /// Whether `ip` is a usable pod address (in the subnet, not network/broadcast/gateway).
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v & self.mask() == self.network()
            && v != self.network()
            && v != self.broadcast()
            && ip != self.gateway
    }
}

/// The allocation table: pod UID → address, plus a cursor so freed addresses are reused last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocator {
    /// Pod UID → address.
    pub allocations: BTreeMap<String, Ipv4Addr>,
    /// The last address handed out.
    pub last: Option<Ipv4Addr>,
}

impl Allocator {
    /// Returns the address of `uid`, allocating the next free one after the cursor if it has none.
    pub fn allocate(&mut self, subnet: &Subnet, uid: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.allocations.get(uid) {
            return Ok(*ip);
        }
        let taken: std::collections::BTreeSet<Ipv4Addr> =
            self.allocations.values().copied().collect();
        let first = subnet.network() + 1;
        let last = subnet.broadcast() - 1;
        let start = match self.last {
            Some(ip) if subnet.is_assignable(ip) => u32::from(ip) + 1,
            _ => first,
        };
        let size = last - first + 1;
        for i in 0..size {
            let candidate = first + (start - first + i) % size;
            let ip = Ipv4Addr::from(candidate);
            if subnet.is_assignable(ip) && !taken.contains(&ip) {
                self.allocations.insert(uid.to_owned(), ip);
                self.last = Some(ip);
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(format!(
            "{}/{}",
            subnet.gateway, subnet.prefix
        )))
    }

    /// Frees the address of `uid`, if any.
    pub fn release(&mut self, uid: &str) -> Option<Ipv4Addr> {
        self.allocations.remove(uid)
    }

    /// Frees every allocation whose UID is not in `live`; returns the freed UIDs.
    pub fn retain_live(&mut self, live: &std::collections::BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .allocations
            .keys()
            .filter(|u| !live.contains(*u))
            .cloned()
            .collect();
        for u in &gone {
            self.allocations.remove(u);
        }
        gone
    }

    /// Reads the table from `path`; a missing file is an empty table.
    pub fn load(path: &Path) -> Result<Self, IpamError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt {
                path: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(IpamError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes the table to `path` atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), IpamError> {
        let io = |source| IpamError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| IpamError::Corrupt {
            path: path.display().to_string(),
            source,
        })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet::parse("10.244.0.1/16").expect("valid")
    }

    #[test]
    fn first_allocation_skips_network_and_gateway() {
        let mut a = Allocator::default();
        assert_eq!(
            a.allocate(&subnet(), "u1").expect("ip"),
            Ipv4Addr::new(10, 244, 0, 2)
        );
        assert_eq!(
            a.allocate(&subnet(), "u2").expect("ip"),
            Ipv4Addr::new(10, 244, 0, 3)
        );
    }

    #[test]
    fn the_same_uid_keeps_its_address() {
        let mut a = Allocator::default();
        let ip = a.allocate(&subnet(), "u1").expect("ip");
        assert_eq!(a.allocate(&subnet(), "u1").expect("ip"), ip);
    }

    #[test]
    fn freed_addresses_are_not_reused_immediately() {
        let mut a = Allocator::default();
        let first = a.allocate(&subnet(), "u1").expect("ip");
        a.release("u1");
        let second = a.allocate(&subnet(), "u2").expect("ip");
        assert_ne!(first, second);
    }

    #[test]
    fn a_small_subnet_wraps_around_and_then_runs_out() {
        let s = Subnet::parse("192.168.5.1/30").expect("valid");
        let mut a = Allocator::default();
        assert_eq!(
            a.allocate(&s, "u1").expect("ip"),
            Ipv4Addr::new(192, 168, 5, 2)
        );
        assert!(matches!(a.allocate(&s, "u2"), Err(IpamError::Exhausted(_))));
        a.release("u1");
        assert_eq!(
            a.allocate(&s, "u3").expect("ip"),
            Ipv4Addr::new(192, 168, 5, 2)
        );
    }

    #[test]
    fn the_table_survives_a_save_and_load_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ipam.json");
        assert_eq!(
            Allocator::load(&path).expect("missing is empty"),
            Allocator::default()
        );
        let mut a = Allocator::default();
        a.allocate(&subnet(), "u1").expect("ip");
        a.save(&path).expect("save");
        let mut b = Allocator::load(&path).expect("load");
        assert_eq!(a, b);
        assert_eq!(
            b.allocate(&subnet(), "u2").expect("ip"),
            Ipv4Addr::new(10, 244, 0, 3)
        );
    }

    #[test]
    fn retain_live_frees_addresses_of_vanished_pods() {
        let mut a = Allocator::default();
        a.allocate(&subnet(), "u1").expect("ip");
        a.allocate(&subnet(), "u2").expect("ip");
        let live = std::collections::BTreeSet::from(["u2".to_owned()]);
        assert_eq!(a.retain_live(&live), vec!["u1".to_owned()]);
        assert_eq!(a.allocations.len(), 1);
    }

    #[test]
    fn bad_subnets_are_rejected() {
        for s in ["10.244.0.1", "10.244.0.1/31", "x/16", "10.244.0.1/abc"] {
            assert!(Subnet::parse(s).is_err(), "{s}");
        }
    }
}
