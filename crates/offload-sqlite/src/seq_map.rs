//! Maps and sets keyed by a task's seq, laid out in seq order.
//!
//! The writer keeps several such maps: the kept pending rows
//! (`pending_rows.rs`), the kept claimed rows (`writer.rs`), the running
//! set (`running.rs`) and the claimed rows not yet written (`claims.rs`).
//! A task passes through each of them at its claim and at its completion,
//! and a claim or a batch of acks takes tasks in runs of consecutive seqs
//! (claim order is seq order within a priority). With a hash that
//! scattered the keys each lookup was a cache miss in the map's control
//! bytes and another in its slot: the maps' lookups were a tenth of the
//! writer's samples through a burn-down (perf, `bench/HISTORY.md`). Here
//! the low bits of the hash, which pick the slot, are the seq's own, so
//! neighbours share cache lines and the processor's prefetch finds the
//! next one.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A map from seq to `V`.
pub(crate) type SeqMap<V> = HashMap<i64, V, BuildHasherDefault<SeqHasher>>;
/// A set of seqs.
pub(crate) type SeqSet = HashSet<i64, BuildHasherDefault<SeqHasher>>;

/// The seq itself in the low bits, which pick the slot; the top seven
/// bits, which the map compares before a key, from a multiplicative hash,
/// so that neighbours still tell apart there. Seqs are handed out by the
/// store, never chosen by a caller, so no resistance to chosen keys is
/// needed.
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_i64(&mut self, seq: i64) {
        let seq = seq as u64;
        self.0 = seq ^ (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (0x7F << 57));
    }

    /// Not used by an `i64` key; any other is hashed byte by byte.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn neighbouring_seqs_take_neighbouring_slots_and_differ_in_their_tags() {
        let hash = |seq: i64| BuildHasherDefault::<SeqHasher>::default().hash_one(seq);
        for seq in [0, 1, 41, 1 << 20, (1 << 40) + 7] {
            assert_eq!(hash(seq + 1) & 0xFFFF, (hash(seq) + 1) & 0xFFFF);
        }
        let tags: HashSet<u64> = (0..128).map(|seq| hash(seq) >> 57).collect();
        assert!(
            tags.len() > 64,
            "only {} tags among 128 neighbours",
            tags.len()
        );
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut map: SeqMap<i64> = SeqMap::default();
        for seq in (0..10_000).chain([1 << 50, -3]) {
            map.insert(seq, seq * 2);
        }
        for seq in (0..10_000).step_by(2) {
            map.remove(&seq);
        }
        assert_eq!(map.len(), 5_002);
        assert_eq!(map.get(&7), Some(&14));
        assert_eq!(map.get(&8), None);
        assert_eq!(map.get(&(1 << 50)), Some(&(1 << 51)));
        assert_eq!(map.get(&-3), Some(&-6));
    }
}
