use super::*;
use crate::record::{Batch, ProducerStamp, Sequences, StoredMessage};
use crate::SequenceCheck;

fn opts() -> StoreOptions {
    StoreOptions {
        segment_bytes: 64 * 1024,
        ..StoreOptions::default()
    }
}

fn create(store: &Store, name: &str) -> u64 {
    let mut txn = store.begin();
    let id = txn.state().create_pending(name, 1);
    drop(txn);
    store
        .append_blocking(vec![Record::ChannelCreated {
            channel_id: id,
            name: name.into(),
            created_ms: 1,
        }])
        .unwrap();
    id
}

fn publish(
    store: &Store,
    channel_id: u64,
    producer: &str,
    first_seq: u64,
    payloads: &[&[u8]],
) -> u64 {
    let mut txn = store.begin();
    let base = txn
        .state()
        .reserve(channel_id, payloads.len() as u64)
        .unwrap();
    let last = first_seq + payloads.len() as u64 - 1;
    txn.state()
        .note_pending_sequence(channel_id, producer, last);
    let (tx, rx) = mpsc::channel();
    txn.append(
        vec![Record::Batch(Batch {
            channel_id,
            base_offset: base,
            timestamp_ms: 1000 + base,
            producer: Some(ProducerStamp {
                producer_id: producer.into(),
                sequences: Sequences::Dense {
                    first: first_seq,
                    count: payloads.len() as u32,
                },
            }),
            messages: payloads
                .iter()
                .map(|p| StoredMessage {
                    headers: vec![],
                    payload: Bytes::copy_from_slice(p),
                })
                .collect(),
        })],
        Box::new(move |r| drop(tx.send(r))),
    )
    .unwrap();
    drop(txn);
    rx.recv().unwrap().unwrap();
    base
}

fn payloads_of(store: &Store, channel_id: u64) -> Vec<(u64, Vec<u8>)> {
    store
        .read(channel_id, 0, usize::MAX, u64::MAX)
        .unwrap()
        .into_iter()
        .map(|m| (m.offset, m.payload.to_vec()))
        .collect()
}

#[test]
fn appended_messages_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    let b = create(&store, "b");
    assert_eq!(publish(&store, a, "p", 1, &[b"one", b"two"]), 0);
    assert_eq!(publish(&store, b, "p", 1, &[b"x"]), 0);
    assert_eq!(publish(&store, a, "p", 3, &[b"three"]), 2);
    assert_eq!(
        payloads_of(&store, a),
        vec![
            (0, b"one".to_vec()),
            (1, b"two".to_vec()),
            (2, b"three".to_vec())
        ]
    );
    let from_one = store.read(a, 1, 1, u64::MAX).unwrap();
    assert_eq!(from_one.len(), 1);
    assert_eq!(from_one[0].offset, 1);
    assert_eq!(from_one[0].timestamp_ms, 1000);
    assert_eq!(store.read(a, 3, 10, u64::MAX).unwrap(), vec![]);
}

#[test]
fn restart_keeps_every_acked_message_and_producer_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let a = create(&store, "a");
        for i in 0..200u64 {
            publish(
                &store,
                a,
                "p",
                i * 2 + 1,
                &[format!("m{i}").as_bytes(), b"pad"],
            );
        }
        store
            .append_blocking(vec![Record::CursorCommitted {
                channel_id: a,
                consumer: "c".into(),
                offset: 17,
            }])
            .unwrap();
    }
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = store.with_state(|s| s.channel_id("a")).unwrap();
    let messages = payloads_of(&store, a);
    assert_eq!(messages.len(), 400);
    assert!(messages
        .iter()
        .enumerate()
        .all(|(i, (o, _))| *o == i as u64));
    store.with_state(|s| {
        let c = s.channel(a).unwrap();
        assert_eq!(c.next_offset, 400);
        assert_eq!(c.consumers["c"], 17);
        assert_eq!(c.producers["p"].durable.last_sequence, Some(400));
        assert_eq!(c.producers["p"].check(399), SequenceCheck::Stored(398));
    });
}

#[test]
fn batches_are_found_after_every_restart() {
    // One-message batches on many channels over many segments: closed segments' entries
    // come back from their index files, the active segment's (only in memory) from
    // scanning it again; checkpoints (a small `checkpoint_bytes`, and one at every close)
    // fall anywhere. Every batch must be found after each restart.
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        checkpoint_bytes: 8 * 1024,
        ..opts()
    };
    let channels = 7u64;
    let mut sent = 0u64;
    for round in 0..4u64 {
        let store = Store::open(dir.path(), options.clone()).unwrap();
        if round == 0 {
            for c in 0..channels {
                create(&store, &format!("c{c}"));
            }
        }
        for _ in 0..(50 + round * 13) {
            let c = sent % channels;
            let seq = sent / channels + 1;
            publish(&store, c, "p", seq, &[format!("{c}/{seq}").as_bytes()]);
            sent += 1;
        }
        drop(store);
        let store = Store::open(dir.path(), options.clone()).unwrap();
        for c in 0..channels {
            let messages = payloads_of(&store, c);
            let expected = sent / channels + u64::from(c < sent % channels);
            assert_eq!(
                messages.len() as u64,
                expected,
                "round {round}, channel {c}"
            );
            for (i, (offset, payload)) in messages.iter().enumerate() {
                assert_eq!(*offset, i as u64);
                assert_eq!(payload, format!("{c}/{}", i + 1).as_bytes());
            }
        }
    }
}

#[test]
fn deleting_the_index_rebuilds_it_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = Store::open(dir.path(), opts()).unwrap();
        let a = create(&store, "a");
        for i in 0..300u64 {
            publish(&store, a, "p", i + 1, &[&[i as u8; 700]]);
        }
        store.with_state(|s| s.snapshot())
    };
    assert!(
        segment::list_segments(&dir.path().join("log"))
            .unwrap()
            .len()
            > 1
    );
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.with_state(|s| s.snapshot()), before);
    let messages = payloads_of(&store, 0);
    assert_eq!(messages.len(), 300);
    assert_eq!(messages[299].1, vec![43u8; 700]);
}

#[test]
fn a_torn_tail_is_cut_off_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let a = create(&store, "a");
        publish(&store, a, "p", 1, &[b"kept"]);
    }
    let seg = segment::segment_path(&dir.path().join("log"), 0);
    let good_len = std::fs::metadata(&seg).unwrap().len();
    // A half-written record: a header promising more bytes than there are.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 3, 9, 9]).unwrap();
    drop(f);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    publish(&store, 0, "p", 2, &[b"after"]);
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(
        payloads_of(&store, 0),
        vec![(0, b"kept".to_vec()), (1, b"after".to_vec())]
    );
}

#[test]
fn a_corrupt_batch_is_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    publish(&store, a, "p", 1, &[b"first-message"]);
    let seg = segment::segment_path(&dir.path().join("log"), 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"first-message")
        .unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    store.shared.files.lock().unwrap().clear();
    let err = store.read(a, 0, 10, u64::MAX).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert_eq!(store.corrupt_reads(), 1);
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let ids: Vec<u64> = (0..8).map(|i| create(&store, &format!("c{i}"))).collect();
    let threads: Vec<_> = ids
        .iter()
        .map(|&id| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    publish(&store, id, "p", i + 1, &[b"x"]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for id in ids {
        let got = payloads_of(&store, id);
        assert_eq!(got.len(), 100);
        assert!(got.iter().enumerate().all(|(i, (o, _))| *o == i as u64));
    }
}

#[test]
fn retention_deletes_consumed_segments_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let floor = |s: &LogState, id: u64| {
        let c = s.channel(id).unwrap();
        c.consumers
            .values()
            .copied()
            .min()
            .unwrap_or(c.first_offset)
    };
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let a = create(&store, "a");
        let slow = create(&store, "slow");
        publish(&store, slow, "q", 1, &[b"pinned?"]);
        for i in 0..400u64 {
            publish(&store, a, "p", i + 1, &[&[1u8; 900]]);
        }
        // Nobody consumes yet: nothing may go.
        assert_eq!(store.retain(floor).unwrap().segments_deleted, 0);
        let commit = |channel_id, offset| {
            store
                .append_blocking(vec![Record::CursorCommitted {
                    channel_id,
                    consumer: "c".into(),
                    offset,
                }])
                .unwrap()
        };
        commit(a, 300);
        commit(slow, 1);
        let disk_before = store.disk_bytes();
        let report = store.retain(floor).unwrap();
        assert!(report.segments_deleted >= 2, "{report:?}");
        assert!(store.disk_bytes() < disk_before);
        let first = store.with_state(|s| s.channel(a).unwrap().first_offset);
        assert!(first > 0 && first <= 300, "first retained offset {first}");
        let read = store.read(a, 0, usize::MAX, u64::MAX).unwrap();
        assert_eq!(read[0].offset, first);
        assert_eq!(read.last().unwrap().offset, 399);
    }
    // The channel records, cursors and producer states of deleted segments survive via the
    // snapshot, with or without the index.
    for wipe_index in [false, true] {
        if wipe_index {
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        }
        let store = Store::open(dir.path(), opts()).unwrap();
        store.with_state(|s| {
            let a = s.channel(s.channel_id("a").unwrap()).unwrap();
            assert_eq!(a.consumers["c"], 300);
            assert_eq!(a.next_offset, 400);
            assert_eq!(a.producers["p"].durable.last_sequence, Some(400));
            let slow = s.channel(s.channel_id("slow").unwrap()).unwrap();
            assert_eq!(slow.next_offset, 1);
            assert_eq!(slow.producers["q"].durable.last_sequence, Some(1));
        });
        let a = store.with_state(|s| s.channel_id("a")).unwrap();
        assert_eq!(
            store
                .read(a, 0, usize::MAX, u64::MAX)
                .unwrap()
                .last()
                .unwrap()
                .offset,
            399
        );
    }
}

#[test]
fn a_retention_snapshot_keeps_offsets_reserved_by_queued_appends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    for i in 0..200u64 {
        publish(&store, a, "p", i + 1, &[&[1u8; 900]]);
    }
    store
        .append_blocking(vec![Record::CursorCommitted {
            channel_id: a,
            consumer: "c".into(),
            offset: 150,
        }])
        .unwrap();
    // Offsets handed to an append that is queued but not yet written.
    let reserved = store.begin().state().reserve(a, 5).unwrap();
    assert_eq!(reserved, 200);
    let report = store
        .retain(|s, id| s.channel(id).map_or(u64::MAX, |c| c.consumers["c"]))
        .unwrap();
    assert!(report.segments_deleted > 0);
    // The snapshot must not hand those offsets out again.
    assert_eq!(store.begin().state().reserve(a, 1), Some(205));
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with a loud note) where mounting is not permitted (not root).
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run"
            );
            return None;
        }
        Some(SmallDisk { path, _dir: dir })
    }
}

impl SmallDisk {
    fn grow(&self, bytes: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_full_disk_refuses_appends_and_loses_nothing_acked() {
    let Some(disk) = SmallDisk::mount(3 * 1024 * 1024) else {
        return;
    };
    let options = StoreOptions {
        segment_bytes: 512 * 1024,
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open(&disk.path, options.clone()).unwrap());
    let a = create(&store, "a");
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut full = 0;
    // Pipelined appends of 10 × 1 KiB until the disk is full a few times over.
    for round in 0..1000u64 {
        let mut pending = Vec::new();
        for i in 0..4u64 {
            let id = round * 4 + i;
            let payloads: Vec<Vec<u8>> = (0..10).map(|k| vec![(id * 10 + k) as u8; 1024]).collect();
            let mut txn = store.begin();
            let base = txn.state().reserve(a, 10).unwrap();
            let (tx, rx) = mpsc::channel();
            let queued = txn.append(
                vec![Record::Batch(Batch {
                    channel_id: a,
                    base_offset: base,
                    timestamp_ms: 1,
                    producer: None,
                    messages: payloads
                        .iter()
                        .map(|p| StoredMessage {
                            headers: vec![],
                            payload: Bytes::copy_from_slice(p),
                        })
                        .collect(),
                })],
                Box::new(move |r| drop(tx.send(r))),
            );
            drop(txn);
            if queued.is_ok() {
                pending.push((base, payloads, rx));
            }
        }
        for (base, payloads, rx) in pending {
            match rx.recv().unwrap() {
                Ok(()) => {
                    for (k, p) in payloads.into_iter().enumerate() {
                        acked.push((base + k as u64, p));
                    }
                }
                Err(e) => {
                    assert!(e.is_full(), "expected a full disk, got {e}");
                    full += 1;
                }
            }
        }
        if full >= 8 {
            break;
        }
    }
    assert!(full >= 8, "the disk never filled");
    assert!(!store.is_poisoned(), "a full disk is not an fsync failure");
    let check = |store: &Store| {
        let head = store.with_state(|s| s.channel(a).unwrap().next_offset);
        assert_eq!(
            head,
            acked.len() as u64,
            "only acked messages are in the log"
        );
        let read = store.read(a, 0, usize::MAX, u64::MAX).unwrap();
        assert_eq!(read.len(), acked.len());
        for (m, (offset, payload)) in read.iter().zip(&acked) {
            assert_eq!(m.offset, *offset);
            assert_eq!(&m.payload[..], &payload[..]);
        }
    };
    check(&store);
    // Offsets stay dense after the failures: the next append continues at the head.
    assert_eq!(
        store.begin().state().reserve(a, 0),
        Some(acked.len() as u64)
    );
    assert!(store.with_state(|s| s.epoch()) >= 1);
    drop(store);
    // The operator makes room; the restart finds exactly what was acked.
    disk.grow(16 * 1024 * 1024);
    let store = Store::open(&disk.path, options).unwrap();
    check(&store);
}

#[test]
fn a_slow_channel_is_compacted_forward_instead_of_pinning_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let floor = |s: &LogState, id: u64| {
        let c = s.channel(id).unwrap();
        c.consumers
            .values()
            .copied()
            .min()
            .unwrap_or(c.first_offset)
    };
    let (fast, slow) = {
        let store = Store::open(dir.path(), opts()).unwrap();
        let fast = create(&store, "fast");
        let slow = create(&store, "slow");
        // The slow channel's only messages sit at the very start of the log.
        publish(&store, slow, "q", 1, &[b"slow-0", b"slow-1"]);
        for i in 0..400u64 {
            publish(&store, fast, "p", i + 1, &[&[1u8; 900]]);
        }
        for (channel, offset) in [(fast, 400), (slow, 0)] {
            store
                .append_blocking(vec![Record::CursorCommitted {
                    channel_id: channel,
                    consumer: "c".into(),
                    offset,
                }])
                .unwrap();
        }
        let disk_before = store.disk_bytes();
        let report = store.retain(floor).unwrap();
        assert!(report.segments_deleted >= 2, "{report:?}");
        assert_eq!(report.batches_copied, 1, "{report:?}");
        assert!(store.disk_bytes() < disk_before / 2);
        let read = store.read(slow, 0, 10, u64::MAX).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].offset, &read[0].payload[..]), (0, &b"slow-0"[..]));
        assert_eq!(
            store.with_state(|s| s.channel(slow).unwrap().first_offset),
            0
        );
        (fast, slow)
    };
    for wipe_index in [false, true] {
        if wipe_index {
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        }
        let store = Store::open(dir.path(), opts()).unwrap();
        let read = store.read(slow, 0, 10, u64::MAX).unwrap();
        assert_eq!(
            read.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(&read[1].payload[..], b"slow-1");
        store.with_state(|s| {
            assert_eq!(s.channel(slow).unwrap().next_offset, 2);
            assert_eq!(
                s.channel(slow).unwrap().producers["q"].check(2),
                SequenceCheck::Stored(1)
            );
            assert_eq!(s.channel(fast).unwrap().next_offset, 400);
        });
    }
    // Appends continue at the head, not at the copies' offsets.
    let store = Store::open(dir.path(), opts()).unwrap();
    publish(&store, slow, "q", 3, &[b"slow-2"]);
    let read = store.read(slow, 0, 10, u64::MAX).unwrap();
    assert_eq!(
        read.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
}

#[test]
fn backlog_bytes_are_exact_inside_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    publish(&store, a, "p", 1, &[b"1", b"22", b"333"]);
    publish(&store, a, "p", 4, &[b"4444"]);
    assert_eq!(store.backlog(a, 0).unwrap(), (10, Some(1000)));
    assert_eq!(store.backlog(a, 1).unwrap(), (9, Some(1000)));
    assert_eq!(store.backlog(a, 2).unwrap(), (7, Some(1000)));
    assert_eq!(store.backlog(a, 3).unwrap(), (4, Some(1003)));
    assert_eq!(store.backlog(a, 4).unwrap(), (0, None));
}

#[test]
fn offset_at_time_finds_the_first_batch_at_or_after_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let id = create(&store, "t");
    // Batches of two at offsets 0, 2, 4, 6, 8, appended at 1000 + base.
    for i in 0..5u64 {
        publish(&store, id, "p", i * 2, &[b"a", b"b"]);
    }
    let at = |t| store.offset_at_time(id, 0, 10, t).unwrap();
    assert_eq!(at(0), 0);
    assert_eq!(at(1000), 0);
    assert_eq!(at(1001), 2);
    assert_eq!(at(1005), 6);
    assert_eq!(at(1008), 8);
    assert_eq!(at(1009), 10, "nothing that new: the head");
    // Bounded by the range asked for (the retained part).
    assert_eq!(store.offset_at_time(id, 4, 10, 0).unwrap(), 4);
    assert_eq!(store.timestamp_at(id, 3).unwrap(), Some(1002));
    assert_eq!(store.timestamp_at(id, 10).unwrap(), None);
}

#[test]
fn appends_with_interval_durability_complete_and_survive_a_close() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let id = create(&store, "t");
        let mut txn = store.begin();
        let base = txn.state().reserve(id, 1).unwrap();
        let (tx, rx) = mpsc::channel();
        txn.append_with(
            vec![Record::Batch(Batch {
                channel_id: id,
                base_offset: base,
                timestamp_ms: 1,
                producer: None,
                messages: vec![StoredMessage {
                    headers: vec![],
                    payload: Bytes::from_static(b"relaxed"),
                }],
            })],
            // Far longer than the test: done must not wait for the fdatasync.
            Durability::Interval(Duration::from_secs(3600)),
            Box::new(move |r| drop(tx.send(r))),
        )
        .unwrap();
        drop(txn);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("done after the write, not after the interval")
            .unwrap();
        store.close();
    }
    let store = Store::open(dir.path(), opts()).unwrap();
    let id = store.with_state(|s| s.channel_id("t")).unwrap();
    assert_eq!(payloads_of(&store, id), vec![(0, b"relaxed".to_vec())]);
}

#[test]
fn reads_answer_the_buffers_their_payloads_lie_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    publish(&store, a, "p", 1, &[b"one", b"two", b"three"]);
    publish(&store, a, "p", 4, &[b"four"]);
    let (messages, buffers) = store
        .read_whole_batches(a, 1, usize::MAX, u64::MAX)
        .unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(buffers.len(), 2, "one buffer per batch read");
    let within = |b: &Bytes, p: &Bytes| {
        let (b0, p0) = (b.as_ptr() as usize, p.as_ptr() as usize);
        p0 >= b0 && p0 + p.len() <= b0 + b.len()
    };
    // A batch's payloads lie side by side in its buffer.
    assert!(within(&buffers[0], &messages[0].payload) && within(&buffers[0], &messages[1].payload));
    assert_eq!(
        messages[0].payload.as_ptr() as usize + messages[0].payload.len(),
        messages[1].payload.as_ptr() as usize
    );
    assert!(within(&buffers[1], &messages[2].payload));
    assert_eq!(&messages[2].payload[..], b"four");
}

#[test]
fn whole_batch_reads_finish_the_batch_that_reaches_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = create(&store, "a");
    publish(&store, a, "p", 1, &[b"0", b"1", b"2", b"3"]);
    publish(&store, a, "p", 5, &[b"4", b"5"]);
    let offsets = |m: &[ReadMessage]| m.iter().map(|m| m.offset).collect::<Vec<_>>();
    // The limit falls inside the first batch: a plain read stops there, a whole-batch read
    // answers the rest of that batch and no more.
    assert_eq!(offsets(&store.read(a, 1, 2, u64::MAX).unwrap()), [1, 2]);
    let (messages, buffers) = store.read_whole_batches(a, 1, 2, u64::MAX).unwrap();
    assert_eq!(offsets(&messages), [1, 2, 3]);
    assert_eq!(buffers.len(), 1);
    // The byte limit likewise; a limit at a batch's end reads no further.
    assert_eq!(
        offsets(&store.read_whole_batches(a, 0, usize::MAX, 1).unwrap().0),
        [0, 1, 2, 3]
    );
    assert_eq!(
        offsets(&store.read_whole_batches(a, 0, 4, u64::MAX).unwrap().0),
        [0, 1, 2, 3]
    );
    assert_eq!(
        offsets(&store.read_whole_batches(a, 3, 2, u64::MAX).unwrap().0),
        [3, 4, 5]
    );
}

/// Creates `channels` channels and publishes `messages` messages of 500 bytes to them in
/// turn (message `i`'s bytes are all `i as u8`), over several segments at [`opts`]; waits
/// for the closed segments' index and summary files. Answers the channels and the segments.
fn round_robin(store: &Store, channels: u64, messages: u64) -> (Vec<u64>, Vec<u64>) {
    let ids: Vec<u64> = (0..channels)
        .map(|c| create(store, &format!("c{c}")))
        .collect();
    for i in 0..messages {
        let c = ids[(i % channels) as usize];
        publish(store, c, "p", i / channels + 1, &[&[i as u8; 500]]);
    }
    store.shared.join_sealers();
    (ids, segment::list_segments(&store.shared.log_dir).unwrap())
}

#[test]
fn closed_segments_are_indexed_in_files_and_only_the_active_one_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let store = Store::open(dir.path(), opts()).unwrap();
    let (channels, ids) = round_robin(&store, 5, 600);
    assert!(ids.len() > 3, "{ids:?}");
    let active = *ids.last().unwrap();
    for &id in &ids[..ids.len() - 1] {
        assert!(crate::index::index_path(&log, id).exists(), "segment {id}");
    }
    assert!(!crate::index::index_path(&log, active).exists());
    // The index files count toward the disk the log takes (`max_disk_bytes`).
    let on_disk: u64 = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(store.disk_bytes(), on_disk);
    // In memory: the active segment's entries, nothing else.
    let in_active = store.shared.summaries.lock().unwrap()[&active]
        .spans
        .iter()
        .map(|(_, s)| s.end_offset - s.first_offset)
        .sum::<u64>();
    assert_eq!(
        store.shared.index.in_memory(),
        (1, in_active as usize),
        "segments and entries held in memory"
    );
    for (n, &c) in channels.iter().enumerate() {
        let messages = payloads_of(&store, c);
        assert_eq!(messages.len(), 120);
        assert_eq!(messages[7].1, vec![(7 * 5 + n) as u8; 500]);
    }
    // Closed segments keep their summaries as sorted lists, the active one as a map.
    let closed = |store: &Store| -> Vec<(u64, bool)> {
        let summaries = store.shared.summaries.lock().unwrap();
        summaries
            .iter()
            .map(|(id, s)| (*id, s.spans.is_closed()))
            .collect()
    };
    let expected: Vec<(u64, bool)> = ids.iter().map(|id| (*id, *id != active)).collect();
    assert_eq!(closed(&store), expected);
    // The last checkpoint lets the next start scan only the active segment.
    drop(store);
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    assert_eq!(
        index.load_checkpoint().unwrap().unwrap().index_from,
        (active, 0)
    );
    drop(index);
    let store = Store::open(dir.path(), opts()).unwrap();
    let reopened = closed(&store);
    assert_eq!(
        reopened[..reopened.len() - 1],
        expected[..expected.len() - 1]
    );
    assert_eq!(payloads_of(&store, channels[2]).len(), 120);
}

#[test]
fn closed_segments_summaries_live_in_files_and_a_lost_one_is_summarized_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let store = Store::open(dir.path(), opts()).unwrap();
    let (channels, ids) = round_robin(&store, 4, 500);
    assert!(ids.len() > 4, "{ids:?}");
    let (closed, active) = (&ids[..ids.len() - 1], *ids.last().unwrap());
    let before = store.shared.summaries.lock().unwrap().clone();
    for &id in closed {
        assert!(
            crate::index::summary_path(&log, id).exists(),
            "segment {id}"
        );
    }
    assert!(!crate::index::summary_path(&log, active).exists());
    drop(store);
    // The checkpoint carries only the active segment's summary.
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    let checkpoint = index.load_checkpoint().unwrap().unwrap();
    let carried: Vec<u64> = checkpoint.summaries.iter().map(|(id, _)| *id).collect();
    assert_eq!(carried, [active]);
    drop(index);

    let summaries = |store: &Store| store.shared.summaries.lock().unwrap().clone();
    // A damaged summary file and a lost one: both segments are summarized again from the
    // log, and their files written again.
    std::fs::write(crate::index::summary_path(&log, closed[0]), b"garbage").unwrap();
    std::fs::remove_file(crate::index::summary_path(&log, closed[2])).unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(summaries(&store), before);
    for &id in closed {
        assert!(
            crate::index::summary_path(&log, id).exists(),
            "segment {id}"
        );
    }
    assert_eq!(payloads_of(&store, channels[1]).len(), 125);
    drop(store);

    // A checkpoint of format 3 carried every summary: it is read, and the summary files
    // written from it.
    for &id in closed {
        std::fs::remove_file(crate::index::summary_path(&log, id)).unwrap();
    }
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    let mut old = index.load_checkpoint().unwrap().unwrap();
    old.format = 3;
    old.summaries = before.iter().map(|(id, s)| (*id, s.clone())).collect();
    // Wrong on purpose for every closed segment: read from the checkpoint, not the log.
    for (_, summary) in old.summaries.iter_mut().filter(|(id, _)| *id != active) {
        summary.add(99, 7, 8, 1);
    }
    index.save_checkpoint_verbatim(&old).unwrap();
    drop(index);
    let store = Store::open(dir.path(), opts()).unwrap();
    let now = summaries(&store);
    for &id in closed {
        assert_eq!(
            now[&id].spans.get(99).map(|s| s.bytes),
            Some(1),
            "segment {id}"
        );
        assert!(
            crate::index::summary_path(&log, id).exists(),
            "segment {id}"
        );
    }
    drop(store);
    // The files hold what that checkpoint said, and the next checkpoint leaves them out.
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    let checkpoint = index.load_checkpoint().unwrap().unwrap();
    let carried: Vec<u64> = checkpoint.summaries.iter().map(|(id, _)| *id).collect();
    assert_eq!(carried, [active]);
    for &id in closed {
        let filed = index.load_summary(id).unwrap();
        assert_eq!(
            filed.spans.get(99).map(|s| s.bytes),
            Some(1),
            "segment {id}"
        );
    }

    // Back to the log's own summaries; then stale files, each of the right shape: another
    // segment's, and one of this segment at another length. Both are refused and the
    // segments summarized again.
    for &id in closed {
        index.write_summary(id, &before[&id]).unwrap();
    }
    std::fs::copy(
        crate::index::summary_path(&log, closed[1]),
        crate::index::summary_path(&log, closed[3]),
    )
    .unwrap();
    let mut longer = before[&closed[2]].clone();
    longer.size += 1;
    index.write_summary(closed[2], &longer).unwrap();
    drop(index);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(summaries(&store), before);
    drop(store);
    // A checkpoint that makes recovery scan every segment (`index_from` at the start): a
    // summary made again there is not added to one read from a file.
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    let mut rescan = index.load_checkpoint().unwrap().unwrap();
    rescan.index_from = (0, 0);
    index.save_checkpoint_verbatim(&rescan).unwrap();
    std::fs::remove_file(crate::index::summary_path(&log, closed[0])).unwrap();
    drop(index);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(summaries(&store), before);
    assert_eq!(payloads_of(&store, channels[3]).len(), 125);
}

#[test]
fn a_segment_summarized_again_past_a_corrupt_record_is_indexed_again_to_match() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ids) = three_hundred_batches(dir.path());
    let log = dir.path().join("log");
    // A record in the middle of the second segment no longer verifies, and that segment's
    // summary file is lost.
    let seg = segment::segment_path(&log, ids[1]);
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    std::fs::remove_file(crate::index::summary_path(&log, ids[1])).unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    // The summary (which retention decides from) and the index (which reads answer from)
    // agree: the segment holds the batches before the bad record.
    let span = store.shared.summaries.lock().unwrap()[&ids[1]]
        .spans
        .get(0)
        .copied()
        .unwrap();
    let in_segment: Vec<IndexEntry> = store
        .shared
        .index
        .scan(0, 0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.segment == ids[1])
        .collect();
    assert!(!in_segment.is_empty());
    assert!(in_segment.iter().all(|e| e.position < mid as u64));
    assert_eq!(span.first_offset, in_segment[0].base_offset);
    assert_eq!(span.end_offset, in_segment.last().unwrap().end_offset());
}

/// A closed store in `dir` holding channel 0 with 300 batches of 700 bytes over more than
/// three segments: its messages and the segment ids.
fn three_hundred_batches(dir: &Path) -> (Vec<(u64, Vec<u8>)>, Vec<u64>) {
    let store = Store::open(dir, opts()).unwrap();
    let a = create(&store, "a");
    for i in 0..300u64 {
        publish(&store, a, "p", i + 1, &[&[i as u8; 700]]);
    }
    let messages = payloads_of(&store, a);
    drop(store);
    let ids = segment::list_segments(&dir.join("log")).unwrap();
    assert!(ids.len() > 3, "{ids:?}");
    (messages, ids)
}

#[test]
fn a_damaged_or_missing_index_file_is_written_again_from_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (before, ids) = three_hundred_batches(dir.path());
    let damaged = crate::index::index_path(&log, ids[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&damaged, &bytes).unwrap();
    let missing = crate::index::index_path(&log, ids[2]);
    std::fs::remove_file(&missing).unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(payloads_of(&store, 0), before);
    assert!(missing.exists());
    assert_ne!(std::fs::read(&damaged).unwrap(), bytes);
    drop(store);
    // A file left by a segment already deleted goes.
    let stray = crate::index::index_path(&log, 1_000);
    std::fs::write(&stray, b"stale").unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert!(!stray.exists());
    assert_eq!(payloads_of(&store, 0), before);
}

#[test]
fn a_store_opens_and_reads_everything_when_an_index_file_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (before, ids) = three_hundred_batches(dir.path());
    // Segment 1's file is gone and cannot be written again: a directory stands where its
    // temporary file would go (as a full disk would refuse it).
    std::fs::remove_file(crate::index::index_path(&log, ids[1])).unwrap();
    let blocker = crate::index::index_path(&log, ids[1]).with_extension("idx.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(payloads_of(&store, 0), before);
    assert!(!crate::index::index_path(&log, ids[1]).exists());
    assert_eq!(
        store.shared.index.in_memory().0,
        2,
        "segment 1 and the active one"
    );
}

#[test]
fn closing_finishes_index_files_before_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let a = create(&store, "a");
        // Each publish fills most of a 64 KiB segment: a roll (and an index file to
        // write) right before the close.
        for i in 0..6u64 {
            publish(&store, a, "p", i + 1, &[&[i as u8; 60_000]]);
        }
    }
    let active = *segment::list_segments(&log).unwrap().last().unwrap();
    let index = Index::open(&dir.path().join("index"), &log).unwrap();
    assert_eq!(
        index.load_checkpoint().unwrap().unwrap().index_from,
        (active, 0)
    );
}

/// A channel of 64 KiB batches (four messages of uneven sizes each, so batches start at
/// unaligned positions) over several closed 1 MiB segments, and every message written.
fn cold_log(dir: &Path) -> (Store, u64, Vec<(u64, Vec<u8>)>) {
    let options = StoreOptions {
        segment_bytes: 1024 * 1024,
        ..StoreOptions::default()
    };
    cold_log_with(dir, options, 60)
}

fn cold_log_with(
    dir: &Path,
    options: StoreOptions,
    batches: u64,
) -> (Store, u64, Vec<(u64, Vec<u8>)>) {
    let store = Store::open(dir, options).unwrap();
    let channel = create(&store, "cold");
    let mut written = Vec::new();
    for b in 0..batches {
        let payloads: Vec<Vec<u8>> = (0..4u64)
            .map(|i| vec![(b * 4 + i) as u8; 16 * 1024 + 13 * i as usize])
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let base = publish(&store, channel, "p", b * 4, &refs);
        written.extend((base..).zip(payloads));
    }
    (store, channel, written)
}

/// Reads the whole channel in steps of at most 1 MiB, as a consumer's deliveries do.
fn read_in_steps(store: &Store, channel: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let (messages, _) = store
            .read_whole_batches(channel, next, 1024, 1024 * 1024)
            .unwrap();
        let Some(last) = messages.last() else {
            return out;
        };
        next = last.offset + 1;
        out.extend(messages.into_iter().map(|m| (m.offset, m.payload.to_vec())));
    }
}

/// Some read went past the page cache, unless the file system refused direct I/O (then
/// the reads just checked went through the cache).
fn assert_read_past_the_cache(store: &Store, what: &str) {
    if store.reads_past_cache() {
        assert!(
            store.direct_reads() > 0,
            "{what} were read through the cache"
        );
    } else {
        eprintln!("the file system refused direct I/O; the buffered reads were checked");
    }
}

#[test]
fn reads_of_closed_segments_go_past_the_page_cache_and_answer_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let (store, channel, written) = cold_log(dir.path());
    assert!(store.shared.active_segment.load(Ordering::Acquire) >= 3);
    assert_eq!(read_in_steps(&store, channel), written);
    assert_read_past_the_cache(&store, "closed segments");
    // Turned off, the same reads go through the cache.
    drop(store);
    let store = Store::open(
        dir.path(),
        StoreOptions {
            segment_bytes: 1024 * 1024,
            direct_reads: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    assert_eq!(read_in_steps(&store, channel), written);
    assert_eq!(store.direct_reads(), 0);
}

#[test]
fn reads_that_the_file_system_refuses_past_the_page_cache_go_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, channel, written) = cold_log(dir.path());
    // As a file system without direct I/O answers (tmpfs before Linux 6.6, some FUSE).
    store
        .shared
        .refuse_direct_in_test
        .store(true, Ordering::Relaxed);
    assert!(store.reads_past_cache(), "on until a read is refused");
    assert_eq!(read_in_steps(&store, channel), written);
    assert!(
        !store.reads_past_cache(),
        "direct reads stayed on after a refusal"
    );
    assert_eq!(store.direct_reads(), 0);
}

#[test]
fn the_active_segment_below_its_dropped_cache_is_read_past_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    // One segment; pages are dropped in 8 MiB steps once fsync'd, with no window kept.
    let options = StoreOptions {
        page_cache_window_bytes: 0,
        ..StoreOptions::default()
    };
    let (store, channel, written) = cold_log_with(dir.path(), options, 160);
    assert_eq!(store.shared.active_segment.load(Ordering::Acquire), 0);
    assert!(store.shared.cache_dropped_to.load(Ordering::Acquire) >= CACHE_DROP_STEP);
    assert_eq!(read_in_steps(&store, channel), written);
    assert_read_past_the_cache(&store, "dropped pages");
}
