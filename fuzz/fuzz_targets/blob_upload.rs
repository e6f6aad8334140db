//! Blob chunk reassembly: a script of begin/feed/abandon/expire operations decoded from
//! the input. Whatever the order, the budget never goes below zero or above its limit,
//! a finished upload hashes to its bytes, and dropping everything returns the budget.
#![no_main]

use gateway::blobs::{
    BlobId,
    upload::{Budget, Fed, Limits, Start, Uploads},
};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

const BUDGET: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::new(BUDGET);
    let mut uploads = Uploads::new(
        Limits {
            max_bytes: 100_000,
            max_uploads: 4,
            idle: Duration::from_secs(10),
        },
        budget.clone(),
    );
    let start = Instant::now();
    let mut clock = 0u64;
    let mut done = Vec::new();
    let mut input = data;
    while let [op, id, rest @ ..] = input {
        let upload = u32::from(*id % 8);
        input = rest;
        match op % 5 {
            0 => {
                let [a, b, rest @ ..] = input else { break };
                input = rest;
                let size = u64::from(u16::from_le_bytes([*a, *b])) * 2;
                let claimed = (size % 3 == 0).then(|| BlobId::of(&[]));
                let _ = uploads.begin(
                    upload,
                    Start {
                        channel: "c".into(),
                        content_type: "image/png".into(),
                        size,
                        claimed,
                    },
                    start + Duration::from_millis(clock),
                );
            }
            1 | 2 => {
                let Some((&n, rest)) = input.split_first() else { break };
                let n = usize::from(n).min(rest.len().saturating_sub(0));
                let (chunk, rest) = rest.split_at(n.min(rest.len()));
                input = rest;
                // Repeat the chunk to reach sizes where the buffer grows several times.
                let chunk: Vec<u8> = chunk.iter().cycle().take(n * 37).copied().collect();
                let last = op % 5 == 2;
                if let Ok(Fed::Done(a)) =
                    uploads.feed(upload, &chunk, last, start + Duration::from_millis(clock))
                {
                    assert_eq!(a.id, BlobId::of(&a.bytes));
                    done.push(a);
                }
            }
            3 => uploads.abandon(upload),
            _ => {
                clock += 4000;
                uploads.expire(start + Duration::from_millis(clock));
            }
        }
        assert!(budget.used() <= BUDGET);
    }
    drop(uploads);
    drop(done);
    assert_eq!(budget.used(), 0, "every reservation is returned");
});
