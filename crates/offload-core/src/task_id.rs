//! Task ids that carry their row's seq, the storage position a backend
//! gives each task in insertion order.
//!
//! A task's id is a UUIDv7: its first 48 bits are the millisecond it was
//! made, `rand_a` is zero and the 62 bits of `rand_b` are the seq. A
//! backend finds a task by id as a seek by seq, and keeps no index of ids.
//! Ids sort as tasks were made and say nothing more than a sequence number
//! would; they were never secrets (access is the tokens' business).
//!
//! The backend checks the id of the row it finds: an id of an older
//! schema may look like one of these by chance (1 in 4,096 UUIDv7s).

use uuid::Uuid;

use crate::Timestamp;

/// The id of the task with `seq`, made at `now`.
#[must_use]
pub fn id_carrying_seq(now: Timestamp, seq: i64) -> Uuid {
    let millis = now.as_millis().clamp(0, (1 << 48) - 1) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70;
    bytes[8..].copy_from_slice(&(seq as u64).to_be_bytes());
    // Variant 0b10 over seq's two top bits, which a seq never uses.
    bytes[8] = 0x80 | (bytes[8] & 0x3f);
    Uuid::from_bytes(bytes)
}

/// The seq that `id` carries, if it is a UUIDv7: where its row is, if it was
/// stored by a backend that makes such ids (the caller checks the id).
#[must_use]
pub fn seq_carried_by(id: Uuid) -> Option<i64> {
    let b = id.as_bytes();
    if b[6] >> 4 != 7 || b[8] >> 6 != 0b10 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[8..]);
    seq[0] &= 0x3f;
    Some(i64::from_be_bytes(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_795_000_000_123);

    #[test]
    fn an_id_carries_its_seq_and_its_time_and_is_a_uuid_v7() {
        for seq in (1..100).chain([(1 << 62) - 1]) {
            let id = id_carrying_seq(NOW, seq);
            assert_eq!(seq_carried_by(id), Some(seq));
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.get_timestamp().expect("v7 has a time").to_unix();
            assert_eq!(
                secs * 1000 + u64::from(nanos) / 1_000_000,
                1_795_000_000_123
            );
        }
    }

    #[test]
    fn ids_sort_as_they_were_made() {
        let a = id_carrying_seq(NOW, 41);
        let b = id_carrying_seq(NOW, 42);
        let c = id_carrying_seq(Timestamp::from_millis(NOW.as_millis() + 1), 43);
        assert!(a < b && b < c);
    }

    #[test]
    fn ids_not_v7_carry_no_seq() {
        assert_eq!(seq_carried_by(Uuid::nil()), None);
        assert_eq!(
            seq_carried_by(uuid::Builder::from_random_bytes([7; 16]).into_uuid()),
            None
        );
        assert_eq!(seq_carried_by(Uuid::max()), None);
    }
}
