//! Maglev lookup tables (Eisenbud et al., NSDI 2016), computed here and read by the kernel.
//!
//! Each backend fills the table in the order of its own permutation, derived from its address
//! only, so every agent builds the same table for the same backends, and removing one backend
//! moves only the clients that were on it (plus about 1/M of the rest).
use std::net::SocketAddr;

/// FNV-1a, with a seed so that offset and skip are independent.
fn hash(seed: u64, addr: &SocketAddr) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in addr.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The table of `size` (prime) entries for `backends` (sorted, deduplicated), holding indexes
/// into `backends`. Empty when there are no backends.
pub fn table(backends: &[SocketAddr], size: usize) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = backends.iter().map(|b| (hash(0x5eed_0001, b) % m, hash(0x5eed_0002, b) % (m - 1) + 1)).collect();
    let mut next = vec![0_u64; backends.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080))).collect()
    }

    #[test]
    fn spreads_evenly() {
        let t = table(&addrs(5), 16_381);
        let mut counts = [0usize; 5];
        for &i in &t {
            counts[i as usize] += 1;
        }
        for c in counts {
            assert!((3_200..=3_360).contains(&c), "uneven share {c} of 16381: {counts:?}");
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_entries() {
        let all = addrs(5);
        let before = table(&all, 16_381);
        let fewer: Vec<_> = all.iter().copied().filter(|a| *a != all[2]).collect();
        let after = table(&fewer, 16_381);
        let moved = before.iter().zip(&after).filter(|&(&b, &a)| all[b as usize] != all[2] && all[b as usize] != fewer[a as usize]).count();
        // Entries not on the removed backend should almost all stay where they were.
        assert!(moved < 16_381 / 50, "{moved} entries of surviving backends moved");
    }

    #[test]
    fn empty_backends_give_empty_table() {
        assert!(table(&[], 7).is_empty());
    }
}
