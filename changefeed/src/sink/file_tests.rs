#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use kvfeed_client::feed::Op;

use super::*;
use crate::def::{ChangefeedId, Format, Mode};

fn def(id: &str) -> ChangefeedDef {
    ChangefeedDef {
        id: ChangefeedId::new(id).unwrap(),
        mode: Mode::Txn,
        start: Vec::new(),
        end: Vec::new(),
        format: Format::Json,
        old_value: false,
        start_ts: TimeStamp::new(10),
    }
}

fn ts(n: u64) -> TimeStamp {
    TimeStamp::new(n)
}

fn row(commit: u64, key: &[u8]) -> Row {
    Row {
        start_ts: ts(commit - 1),
        commit_ts: ts(commit),
        op: Op::Put,
        key: Bytes::copy_from_slice(key),
        value: Bytes::from_static(&[0xff, b'v']),
        old_value: Bytes::new(),
    }
}

async fn window(sink: &mut FileSink, from: u64, to: u64, rows: &[Row]) {
    sink.begin_window(ts(from), ts(to)).await.unwrap();
    sink.write(rows).await.unwrap();
    sink.commit_window().await.unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn windows_become_files_that_sort_by_commit_ts_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let mut sink = FileSink::new(dir.clone());
    assert_eq!(sink.open(&def("a")).await.unwrap(), None);
    window(
        &mut sink,
        10,
        99,
        &[row(20, b"a"), row(20, b"b"), row(99, b"c")],
    )
    .await;
    window(&mut sink, 99, 150, &[]).await;
    window(&mut sink, 150, 1000, &[row(1000, &[0x00, 0xfe])]).await;
    drop(sink);
    assert_eq!(
        names(&dir),
        [
            "00000000000000000010-00000000000000000099.ndjson",
            // The empty window (99, 150] is folded into the next file.
            "00000000000000000099-00000000000000001000.ndjson",
            "LOCK",
            "changefeed.json",
            "checkpoint.json",
        ]
    );
    // The checkpoint file holds the last empty window's end; the data file
    // after it records the rest (readers roll forward to it).
    let ckpt = fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(ckpt, r#"{"checkpoint_ts":150}"#);

    let reader = FileSinkReader::open(&dir).unwrap();
    assert_eq!(reader.def(), &def("a"));
    assert_eq!(reader.checkpoint(), Some(ts(1000)));
    let rows: Vec<FileRow> = reader.rows().map(Result::unwrap).collect();
    let keys: Vec<&[u8]> = rows.iter().map(|r| &r.row.key[..]).collect();
    assert_eq!(keys, [&b"a"[..], b"b", b"c", &[0x00, 0xfe]]);
    assert_eq!(rows[2].line, 3);
    assert_eq!(rows[3].line, 1);
    assert_eq!(rows[3].row, row(1000, &[0x00, 0xfe]));
}

#[tokio::test]
async fn empty_windows_advance_the_checkpoint_without_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FileSink::new(tmp.path().to_owned());
    sink.open(&def("a")).await.unwrap();
    window(&mut sink, 10, 20, &[]).await;
    window(&mut sink, 20, 30, &[]).await;
    drop(sink);
    assert_eq!(
        names(tmp.path()),
        ["LOCK", "changefeed.json", "checkpoint.json"]
    );
    let mut sink = FileSink::new(tmp.path().to_owned());
    assert_eq!(sink.open(&def("a")).await.unwrap(), Some(ts(30)));
    // Windows must go on from the checkpoint.
    assert!(sink.begin_window(ts(20), ts(40)).await.is_err());
    sink.begin_window(ts(30), ts(40)).await.unwrap();
    sink.write(&[row(35, b"ok")]).await.unwrap();
    assert!(sink.write(&[row(30, b"x")]).await.is_err());
    // The broken window cannot be committed: the sink must be reopened.
    assert!(sink.commit_window().await.is_err());
    assert_eq!(sink.open(&def("a")).await.unwrap(), Some(ts(30)));
}

#[tokio::test]
async fn an_interrupted_window_is_undone_and_a_complete_one_rolls_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut sink = FileSink::new(dir.clone());
    sink.open(&def("a")).await.unwrap();
    window(&mut sink, 10, 20, &[row(15, b"a")]).await;
    drop(sink);
    // As if killed: a later window renamed into place but checkpoint.json
    // not yet replaced, and the one after half written.
    let done = data_name(ts(20), ts(30));
    let mut line = Vec::new();
    format::encode(&def("a"), &row(25, b"b"), &mut line);
    line.push(b'\n');
    fs::write(dir.join(&done), &line).unwrap();
    fs::write(
        dir.join(format!("{}.tmp", data_name(ts(30), ts(40)))),
        b"{\"op\":",
    )
    .unwrap();
    fs::write(dir.join("checkpoint.json.tmp"), b"{").unwrap();

    // The reader rolls forward without touching anything.
    let reader = FileSinkReader::open(&dir).unwrap();
    assert_eq!(reader.checkpoint(), Some(ts(30)));
    assert_eq!(reader.rows().filter(Result::is_ok).count(), 2);
    assert!(names(&dir).iter().any(|n| n.ends_with(".tmp")));

    let mut sink = FileSink::new(dir.clone());
    assert_eq!(sink.open(&def("a")).await.unwrap(), Some(ts(30)));
    assert!(
        !names(&dir).iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        names(&dir)
    );
    let ckpt = fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(ckpt, r#"{"checkpoint_ts":30}"#);
    window(&mut sink, 30, 40, &[row(40, b"c")]).await;
    let reader = FileSinkReader::open(&dir).unwrap();
    assert_eq!(reader.rows().filter(Result::is_ok).count(), 3);
}

#[tokio::test]
async fn another_changefeed_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FileSink::new(tmp.path().to_owned());
    sink.open(&def("a")).await.unwrap();
    window(&mut sink, 10, 20, &[row(15, b"a")]).await;
    drop(sink);
    let mut sink = FileSink::new(tmp.path().to_owned());
    let err = sink.open(&def("b")).await.unwrap_err();
    assert!(matches!(err, SinkError::DefMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("\"a\"") && text.contains("\"b\""), "{text}");
    assert!(err.is_permanent());
    // Another start ts is the same changefeed.
    let later = ChangefeedDef {
        start_ts: ts(12),
        ..def("a")
    };
    assert_eq!(sink.open(&later).await.unwrap(), Some(ts(20)));
}

#[tokio::test]
async fn a_second_sink_on_the_directory_is_refused_while_the_first_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = FileSink::new(tmp.path().to_owned());
    first.open(&def("a")).await.unwrap();
    let mut second = FileSink::new(tmp.path().to_owned());
    let err = second.open(&def("a")).await.unwrap_err();
    assert!(matches!(err, SinkError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("held by another changefeed process")
    );
    drop(first);
    second.open(&def("a")).await.unwrap();
}

#[tokio::test]
async fn an_unwritable_directory_is_a_clear_permanent_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    fs::write(&file, b"x").unwrap();
    let mut sink = FileSink::new(file.join("out"));
    let err = sink.open(&def("a")).await.unwrap_err();
    assert!(matches!(err, SinkError::Unwritable { .. }), "{err}");
    assert!(err.to_string().contains("plain/out"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert!(err.is_permanent());
}

#[tokio::test]
async fn the_reader_reports_gaps_and_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut sink = FileSink::new(dir.clone());
    sink.open(&def("a")).await.unwrap();
    window(&mut sink, 10, 20, &[row(15, b"a")]).await;
    window(&mut sink, 20, 30, &[row(25, b"b")]).await;
    drop(sink);
    fs::rename(
        dir.join(data_name(ts(20), ts(30))),
        dir.join(data_name(ts(22), ts(30))),
    )
    .unwrap();
    fs::write(dir.join(data_name(ts(30), ts(40))), b"{\"op\":\"put\"}\n").unwrap();
    let reader = FileSinkReader::open(&dir).unwrap();
    let items: Vec<_> = reader.rows().collect();
    assert!(items[0].is_ok());
    let gap = items[1].as_ref().unwrap_err().to_string();
    assert!(gap.contains("a gap"), "{gap}");
    assert!(items[2].is_ok());
    let bad = items[3].as_ref().unwrap_err();
    assert!(matches!(bad, SinkError::BadRow { line: 1, .. }), "{bad}");
    assert_eq!(items.len(), 4);
}

/// Throughput of 128-byte values through the sink:
/// `cargo test --release -p kvfeed-changefeed file_sink_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn file_sink_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FileSink::new(tmp.path().to_owned());
    sink.open(&def("a")).await.unwrap();
    let total = 1_000_000u64;
    let rows: Vec<Row> = (0..total)
        .map(|i| Row {
            start_ts: ts(100 + i / 4),
            commit_ts: ts(101 + i / 4),
            op: Op::Put,
            key: Bytes::from(format!("key-{i:012}")),
            value: Bytes::from(vec![b'x'; 128]),
            old_value: Bytes::new(),
        })
        .collect();
    let start = std::time::Instant::now();
    sink.begin_window(ts(10), ts(1_000_000)).await.unwrap();
    for chunk in rows.chunks(1000) {
        sink.write(chunk).await.unwrap();
    }
    sink.commit_window().await.unwrap();
    let elapsed = start.elapsed();
    let small = std::time::Instant::now();
    sink.begin_window(ts(1_000_000), ts(1_000_001))
        .await
        .unwrap();
    sink.write(&[row(1_000_001, b"k")]).await.unwrap();
    sink.commit_window().await.unwrap();
    println!(
        "{total} rows in {elapsed:?}: {:.0} rows/s; a one-row window commits in {:?}",
        total as f64 / elapsed.as_secs_f64(),
        small.elapsed()
    );
}
