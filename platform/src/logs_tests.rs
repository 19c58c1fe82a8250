use super::*;

fn at(dir: &Path, file: &str) -> PathBuf {
    test_path(dir, file)
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(at(dir, file), text).unwrap();
}

fn append(dir: &Path, file: &str, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(at(dir, file))
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn poll(logs: &mut Logs) -> String {
    let mut out = Vec::new();
    logs.poll(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// The first boot, then instances by number (10 after 2); within a log,
/// the rotated `.1` before the current file; empty logs get no header.
#[test]
fn logs_come_in_start_order_rotated_part_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "10.log", "ten\n");
    write(d, "2.log.1", "two, older\n");
    write(d, "2.log", "two, newer\n");
    write(d, "boot.log", "booted\n");
    write(d, "boot.log.1", "booting\n");
    write(d, "3.log", "");
    write(d, "4.log.1", "four, rotated, no current yet");
    let mut logs = Logs::new(d);
    assert_eq!(
        poll(&mut logs),
        "==> boot <==\nbooting\nbooted\n\
         ==> 2 <==\ntwo, older\ntwo, newer\n\
         ==> 4 <==\nfour, rotated, no current yet\n\
         ==> 10 <==\nten\n"
    );
    assert_eq!(poll(&mut logs), "", "nothing new");
}

/// Following: appended bytes, then a rotation (the rest of the old file,
/// then the new one), a new instance's log, a second rotation between two
/// polls (the file in between is read from `.1`), and a truncation.
#[test]
fn following_picks_up_appends_rotations_and_new_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "1.log", "a\n");
    let mut logs = Logs::new(d);
    assert_eq!(poll(&mut logs), "==> 1 <==\na\n");

    append(d, "1.log", "b\n");
    assert_eq!(poll(&mut logs), "b\n", "same log: no second header");

    append(d, "1.log", "c\n");
    std::fs::rename(at(d, "1.log"), at(d, "1.log.1")).unwrap();
    write(d, "1.log", "d\n");
    write(d, "2.log", "x\n");
    assert_eq!(poll(&mut logs), "c\nd\n==> 2 <==\nx\n");

    append(d, "1.log", "e\n");
    std::fs::rename(at(d, "1.log"), at(d, "1.log.1")).unwrap();
    write(d, "1.log", "f\n");
    std::fs::rename(at(d, "1.log"), at(d, "1.log.1")).unwrap();
    write(d, "1.log", "g\n");
    assert_eq!(poll(&mut logs), "==> 1 <==\ne\nf\ng\n");

    write(d, "1.log", "");
    assert_eq!(poll(&mut logs), "");
    append(d, "1.log", "h\n");
    assert_eq!(poll(&mut logs), "h\n", "truncated in place: from the start");
}

/// A partial last line is ended before the next header, and by `finish`.
#[test]
fn headers_start_on_their_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "boot.log", "no newline");
    write(d, "1.log", "x");
    let mut logs = Logs::new(d);
    let mut out = Vec::new();
    logs.poll(&mut out).unwrap();
    logs.finish(&mut out).unwrap();
    assert_eq!(out, b"==> boot <==\nno newline\n==> 1 <==\nx\n");
}

/// A writer that records the largest single write.
#[derive(Default)]
struct Largest {
    total: usize,
    largest: usize,
}

impl Write for Largest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.total += buf.len();
        self.largest = self.largest.max(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A big log goes out in chunks of at most `CHUNK` bytes: the reader
/// never holds a whole file.
#[test]
fn a_big_log_is_streamed_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![b'x'; 40 * CHUNK + 7];
    std::fs::write(at(dir.path(), "boot.log"), &big).unwrap();
    let mut logs = Logs::new(dir.path());
    let mut out = Largest::default();
    logs.poll(&mut out).unwrap();
    assert_eq!(out.total, "==> boot <==\n".len() + big.len());
    assert!(out.largest <= CHUNK, "{} bytes at once", out.largest);
}

/// A writer that fails: the reader stops with its error.
struct Closed;

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_closed_reader_ends_the_stream_and_a_missing_folder_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "boot.log", "x\n");
    let err = Logs::new(dir.path()).poll(&mut Closed).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    let mut gone = Logs::new(dir.path().join("missing"));
    assert_eq!(poll(&mut gone), "");
}

#[test]
fn tail_reads_only_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = at(dir.path(), "boot.log");
    std::fs::write(&path, "0123456789").unwrap();
    assert_eq!(tail(&path, 4), "6789");
    assert_eq!(tail(&path, 100), "0123456789");
    assert_eq!(tail(&dir.path().join("none"), 4), "");
}

/// Only the newest instance logs and the live ones are kept; the first
/// boot's log always is.
#[test]
fn prune_keeps_the_newest_and_the_live_instance_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "boot.log", "b");
    for id in [1, 2, 3, 10, 11, 12] {
        write(d, &format!("{id}.log"), "x");
        write(d, &format!("{id}.log.1"), "x");
    }
    prune(d, 3, &[2]);
    let mut left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["10", "11", "12", "2", "boot"]);
    assert!(at(d, "12.log.1").exists() && at(d, "boot.log").exists());
}
