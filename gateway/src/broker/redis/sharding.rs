//! Which Redis server (of several independent ones) holds a channel, and which of a
//! server's pub/sub connections carries it: rendezvous hashing over a hash that is stable
//! across processes and versions, so every node makes the same choice.

/// FNV-1a, then murmur3's 64-bit finalizer: stable across processes and versions (unlike
/// std's hasher), so every node maps a channel to the same server and connection. The
/// finalizer matters: plain FNV-1a of two URLs differing only in the port digits ranks the
/// servers the same way for most channels, and rendezvous hashing then piles every channel
/// onto one server.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Rendezvous hashing: the server with the highest score for the channel wins, so adding
/// or removing a server moves only the channels that scored highest there.
pub fn pick_server(servers: &[String], channel: &str) -> usize {
    (0..servers.len())
        .max_by_key(|&i| stable_hash(&[servers[i].as_bytes(), channel.as_bytes()]))
        .unwrap_or(0)
}

/// Which of `connections` pub/sub connections carries `channel`.
pub fn pick_connection(connections: usize, channel: &str) -> usize {
    stable_hash(&[channel.as_bytes()]) as usize % connections.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_hashing_spreads_channels_whatever_the_ports() {
        let channels: Vec<String> = (0..1000).map(|i| format!("shard{i}")).collect();
        for seed in 0..50u32 {
            // Pairs of nearby ports like the ones tests and deployments get.
            let port = 20_000 + seed * 797 % 40_000;
            let urls = vec![
                format!("redis://127.0.0.1:{port}"),
                format!("redis://127.0.0.1:{}", port + 1 + seed % 7),
            ];
            let on_first = channels
                .iter()
                .filter(|c| pick_server(&urls, c) == 0)
                .count();
            assert!(
                (350..650).contains(&on_first),
                "{urls:?}: {on_first} of 1000 on the first server"
            );
        }
    }

    #[test]
    fn rendezvous_hashing_is_stable_and_moves_little() {
        let three: Vec<String> = (0..3)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let four: Vec<String> = (0..4)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let channels: Vec<String> = (0..1000).map(|i| format!("c{i}")).collect();
        let mut per = [0; 3];
        let mut moved = 0;
        for c in &channels {
            let a = pick_server(&three, c);
            per[a] += 1;
            assert_eq!(a, pick_server(&three, c));
            let b = pick_server(&four, c);
            if a != b {
                assert_eq!(b, 3, "a channel only moves to the new server");
                moved += 1;
            }
        }
        assert!(per.iter().all(|&n| n > 250), "{per:?}");
        assert!((150..350).contains(&moved), "{moved}");
    }
}
