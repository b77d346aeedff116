//! Interop with QEMU as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `vhost-user-blk-pci` device (2 queues) on blk-backend boots the Debian
//! guest from `scripts/guest-image`. The guest writes random data with dd,
//! drops its caches, reads it back and prints both SHA-256 sums; the test
//! checks the host image file holds exactly what the guest wrote. A third
//! test live-migrates (to nowhere) a guest reading its disk: QEMU migrates
//! a vhost-user device only with a backend offering LOG_ALL, and drives
//! our dirty log (SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG, then off).
//!
//! Needs `qemu-system-x86_64` and the guest image. Without QEMU the test
//! prints why and passes, unless `BLK_REQUIRE_QEMU=1` (set it in CI).

mod common;

use std::time::Duration;

use backends::qemu::{have_qemu, sha256, value, KillMoments, QemuGuest};
use common::*;

const GUEST_SCRIPT: &str = r#"set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "HWQ=$(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=64k count=16 2>/dev/null
taskset 1 dd if=/tmp/a of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null &
taskset 2 dd if=/tmp/b of=/dev/vda bs=64k seek=48 conv=fsync 2>/dev/null &
wait
sync
echo 3 > /proc/sys/vm/drop_caches
echo "WROTE-A=$(sha256sum < /tmp/a | cut -d' ' -f1)"
echo "WROTE-B=$(sha256sum < /tmp/b | cut -d' ' -f1)"
echo "READ-A=$(dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "READ-B=$(dd if=/dev/vda bs=64k skip=48 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

/// Five minutes per guest run: TCG on a loaded 2-CPU machine is slow.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Boots the guest with `script` on a 2-queue vhost-user-blk device at `socket`.
/// QEMU's vhost-user-blk device on the chardev `c0`, with two queues.
const BLK_DEVICE: [&str; 2] = [
    "-device",
    "vhost-user-blk-pci,chardev=c0,num-queues=2,romfile=",
];

fn boot(socket: &std::path::Path, script: &str) -> QemuGuest {
    QemuGuest::boot(socket, &BLK_DEVICE, script)
}

fn qemu_missing() -> bool {
    !have_qemu("BLK_REQUIRE_QEMU")
}

#[test]
fn qemu_guest_writes_reach_the_host_file_through_blk_backend() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu");
    let (backend, image) = Backend::with_image(&dir, 64 << 20, &["--queues", "2"]);

    let console = boot(&backend.socket, GUEST_SCRIPT).finish(GUEST_TIMEOUT);

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "SIZE="), "131072");
    assert_eq!(value(&console, "HWQ="), "2");
    assert_eq!(value(&console, "READ-A="), value(&console, "WROTE-A="));
    assert_eq!(value(&console, "READ-B="), value(&console, "WROTE-B="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(sha256(&disk[1 << 20..2 << 20]), value(&console, "WROTE-A="));
    assert_eq!(sha256(&disk[3 << 20..4 << 20]), value(&console, "WROTE-B="));
}

const KILL_SCRIPT: &str = r#"dd if=/dev/urandom of=/tmp/a bs=64k count=256 2>/dev/null
echo WRITING
dd if=/tmp/a of=/dev/vda bs=4k oflag=direct conv=fsync 2>/dev/null
echo "DD-RC=$?"
echo 3 > /proc/sys/vm/drop_caches
echo "WROTE=$(sha256sum < /tmp/a | cut -d' ' -f1)"
echo "READ=$(dd if=/dev/vda bs=64k count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "IOERRORS=$(dmesg | grep -c -i 'I/O error')"
"#;

/// QEMU reconnects (`reconnect=1`) to a blk-backend restarted after kill -9
/// during the guest's dd, passing back the inflight region: the guest sees
/// no error and the host file holds every byte.
#[test]
fn qemu_guest_survives_backend_kill_9_mid_write() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu-kill");
    let (mut backend, image) = Backend::with_image(&dir, 64 << 20, &["--queues", "2"]);
    let qemu = boot(&backend.socket, KILL_SCRIPT);
    qemu.wait_for("WRITING", GUEST_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));

    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    let _restarted = Backend::spawn(
        &backend.socket,
        &["--queues", "2", "--image", image.to_str().unwrap()],
    );
    let console = qemu.finish(GUEST_TIMEOUT);

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "DD-RC="), "0");
    assert_eq!(value(&console, "IOERRORS="), "0");
    assert_eq!(value(&console, "READ="), value(&console, "WROTE="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(sha256(&disk[..16 << 20]), value(&console, "WROTE="));
}

const READ_LOOP: &str = r#"echo READING
i=0
while true; do
  i=$((i+1))
  echo "READ-$i=$(dd if=/dev/vda bs=64k count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
done
"#;

/// The sums the guest printed (`READ-n=...`), in order. Only whole lines
/// count: the console may end in the middle of one.
fn read_sums(console: &str) -> Vec<String> {
    let whole = console.rsplit_once('\n').map_or("", |(lines, _)| lines);
    whole
        .lines()
        .filter_map(|l| l.trim().strip_prefix("READ-"))
        .filter_map(|l| l.split_once('=').map(|(_, sum)| sum.to_string()))
        .collect()
}

/// QEMU live-migrates (into `cat > /dev/null`) a guest reading its disk in
/// a loop: the migration completes (QEMU refuses it for a vhost-user device
/// without LOG_ALL), the guest, resumed on the source, reads on, and every
/// read returns the disk's content.
#[test]
fn qemu_live_migrates_a_guest_reading_through_blk_backend() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu-migrate");
    let (backend, image) = Backend::with_image(&dir, 64 << 20, &[]);
    let data = pattern(42, 16 << 20);
    std::fs::write(&image, [&data[..], &vec![0u8; 48 << 20][..]].concat()).unwrap();
    let device = [
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=1,romfile=",
    ];
    let qemu = QemuGuest::boot_with_monitor(
        &backend.socket,
        &device,
        READ_LOOP,
        &dir.path("monitor.sock"),
    );
    qemu.wait_for("READ-2=", GUEST_TIMEOUT);

    qemu.hmp("migrate \"exec:cat > /dev/null\"");
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    let status = loop {
        let info = qemu.hmp("info migrate");
        let status = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("Migration status: "))
            .unwrap_or_default()
            .to_string();
        if status != "active" && status != "setup" || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = read_sums(&qemu.console()).len();
    qemu.hmp("cont");
    let after_cont = format!("READ-{}=", before + 2);
    let console = qemu.wait_for(&after_cont, GUEST_TIMEOUT);

    assert_eq!(status, "completed", "{}", qemu.hmp("info migrate"));
    let sums = read_sums(&console);
    assert!(
        sums.len() >= before + 2,
        "no reads after the migration:\n{console}"
    );
    let expected = sha256(&data);
    assert!(sums.iter().all(|s| *s == expected), "{sums:?}");
}

/// Backend kills in [`qemu_guest_writes_on_through_a_crash_loop`].
const CRASH_KILLS: usize = 50;
/// Destination slots of 1 MiB at the start of the disk.
const SLOTS: usize = 8;
/// Source chunks of 1 MiB the host writes at [`SOURCE`] before boot. Seven
/// chunks for eight slots: round `r` writes chunk `r % 7` into slot `r % 8`,
/// so a slot's next round always brings another chunk and a lost write
/// leaves the wrong one behind.
const CHUNKS: usize = 7;
const CHUNK: usize = 1 << 20;
const SOURCE: usize = 32 << 20;
const CRASH_DISK: usize = 64 << 20;

/// The guest reads the source chunks (O_DIRECT), then writes them round after
/// round into the slots with O_DIRECT 4 KiB writes and reads each slot back
/// (O_DIRECT) against the chunk's SHA-256, until the host puts `STOP` in the
/// disk's last sector; then it re-reads every slot and counts I/O errors.
const CRASH_SCRIPT: &str = r#"for c in 0 1 2 3 4 5 6; do
  dd if=/dev/vda of=/tmp/c$c bs=4k skip=$((8192 + c * 256)) count=256 iflag=direct 2>/dev/null || echo "READ-FAIL chunk $c"
  sha256sum < /tmp/c$c | cut -d' ' -f1 > /tmp/c$c.sum
  echo "CHUNK-$c=$(cat /tmp/c$c.sum)"
done
echo WRITING
r=0
while [ "$(dd if=/dev/vda bs=512 skip=131071 count=1 iflag=direct 2>/dev/null | tr -d '\000')" != STOP ]; do
  s=$((r % 8)); c=$((r % 7))
  echo "ROUND-START $r"
  dd if=/tmp/c$c of=/dev/vda bs=4k seek=$((s * 256)) oflag=direct 2>/dev/null || echo "WRITE-FAIL $r"
  got=$(dd if=/dev/vda bs=4k skip=$((s * 256)) count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/c$c.sum)" ] || echo "VERIFY-FAIL $r"
  echo $c > /tmp/slot$s
  echo "ROUND-OK $r"
  r=$((r + 1))
done
echo "ROUNDS=$r"
bad=0
for s in 0 1 2 3 4 5 6 7; do
  [ -f /tmp/slot$s ] || continue
  c=$(cat /tmp/slot$s)
  got=$(dd if=/dev/vda bs=4k skip=$((s * 256)) count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/c$c.sum)" ] || bad=$((bad + 1))
  echo "SLOT-$s=$c"
done
echo "FINAL-BAD=$bad"
echo "IOERRORS=$(dmesg | grep -c -i -e 'I/O error' -e 'blk_update_request')"
"#;

/// Chunk `c` of the source region: pseudo-random bytes (splitmix64 of the
/// chunk and offset), so no two 4 KiB blocks are alike and a block written
/// in the wrong place shows.
fn source_chunk(c: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(c as u64 + 1);
    (0..CHUNK / 8)
        .flat_map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

/// The `requests` total of the backend's metrics endpoint at `metrics`, or
/// None while it does not answer.
fn requests(metrics: &std::path::Path) -> Option<u64> {
    let reply = backends::metrics_server::get(metrics, "/counters", Duration::from_secs(2)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
    v.pointer("/totals/requests")
        .and_then(serde_json::Value::as_u64)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Each vCPU's instruction pointer and halt state (`HLT=1`) from QEMU's
/// `info registers -a` answer; the whole answer if it has none.
fn cpu_states(answer: &str) -> String {
    let cpus: Vec<&str> = answer
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CPU#") || l.contains("HLT="))
        .collect();
    if cpus.is_empty() {
        answer.to_string()
    } else {
        cpus.join("\n")
    }
}

/// Waits until the backend behind `metrics` has taken a request: QEMU has
/// reconnected and the guest's I/O flows again. Panics after `timeout`,
/// with the kills so far, whether the backend still runs, and the ends of
/// its log (every restart's, in `backend_log`), QEMU's stderr and the
/// guest's console.
fn wait_for_requests(
    metrics: &std::path::Path,
    timeout: Duration,
    qemu: &QemuGuest,
    backend: &mut Backend,
    backend_log: &std::path::Path,
    kills: usize,
) {
    let deadline = std::time::Instant::now() + timeout;
    while requests(metrics).unwrap_or(0) == 0 {
        if std::time::Instant::now() >= deadline {
            let alive = match backend.child.try_wait() {
                Ok(None) => "still runs".to_string(),
                Ok(Some(status)) => format!("exited ({status})"),
                Err(e) => format!("cannot be waited for ({e})"),
            };
            panic!(
                "no request reached the backend within {timeout:?} after {kills} kills: \
                 QEMU did not reconnect, or the guest's I/O stalled; the backend {alive}\n\
                 --- QEMU's vCPUs:\n{}\n\
                 --- backend log ends:\n{}\n--- QEMU stderr ends:\n{}\n--- console ends:\n{}",
                cpu_states(&qemu.hmp("info registers -a")),
                tail(
                    &std::fs::read_to_string(backend_log).unwrap_or_default(),
                    15
                ),
                tail(&qemu.stderr(), 15),
                tail(&qemu.console(), 15),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `ROUND-` marker on the console is a start: the guest is writing
/// or verifying a slot.
fn mid_round(console: &str) -> bool {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ROUND-"))
        .is_some_and(|l| l.starts_with("START"))
}

/// Blocks of 4 KiB in `got` that differ from `want`.
fn bad_blocks(got: &[u8], want: &[u8]) -> usize {
    got.chunks(4096)
        .zip(want.chunks(4096))
        .filter(|(g, w)| g != w)
        .count()
}

/// QEMU's `reconnect=1` through a crash loop: blk-backend is killed with
/// SIGKILL 50 times, each time at a random moment (0–700 ms) after the
/// restarted backend took the guest's first request, while the guest writes
/// and verifies 1 MiB slots with O_DIRECT. Every restart serves the same
/// image; QEMU hands back the inflight region and the guest goes on. The
/// guest stops only when the host writes `STOP` after the last kill, so its
/// work spans every kill. No I/O error in the guest, every round verified,
/// and the host file holds, block by block, the chunk the guest last wrote
/// in each slot.
#[test]
fn qemu_guest_writes_on_through_a_crash_loop() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu-crash");
    let image = dir.path("disk.img");
    let chunks: Vec<Vec<u8>> = (0..CHUNKS).map(source_chunk).collect();
    let mut disk = vec![0u8; CRASH_DISK];
    for (c, data) in chunks.iter().enumerate() {
        disk[SOURCE + c * CHUNK..SOURCE + (c + 1) * CHUNK].copy_from_slice(data);
    }
    std::fs::write(&image, &disk).unwrap();
    let metrics = dir.path("metrics.sock");
    let args = [
        "--image",
        image.to_str().unwrap(),
        "--queues",
        "2",
        "--metrics-socket",
        metrics.to_str().unwrap(),
    ];
    let socket = dir.path("blk.sock");
    // Every restart's log, kept for a failure's report.
    let backend_log = dir.path("backend.log");
    let spawn = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&backend_log)
            .unwrap();
        Backend::spawn_with_stderr(&socket, &args, log.into())
    };
    let mut backend = spawn();
    // The monitor tells a stalled guest's state (each vCPU halted or
    // running, and where) in a failure's report.
    let qemu = QemuGuest::boot_with_monitor(
        &socket,
        &BLK_DEVICE,
        CRASH_SCRIPT,
        &dir.path("monitor.sock"),
    );
    let started = std::time::Instant::now();
    let mut moments = KillMoments::new("BLK_CRASH_SEED");
    let writing = qemu.wait_for("WRITING", GUEST_TIMEOUT);
    assert!(
        writing.contains("WRITING"),
        "guest never started:\n{writing}"
    );

    let mut kills_mid_round = 0;
    let mut reconnects = 0;
    for kills in 0..CRASH_KILLS {
        wait_for_requests(
            &metrics,
            Duration::from_secs(60),
            &qemu,
            &mut backend,
            &backend_log,
            kills,
        );
        reconnects += 1;
        std::thread::sleep(moments.below(Duration::from_millis(700)));
        kills_mid_round += usize::from(mid_round(&qemu.console()));
        backend.child.kill().unwrap();
        backend.child.wait().unwrap();
        backend = spawn();
    }
    wait_for_requests(
        &metrics,
        Duration::from_secs(60),
        &qemu,
        &mut backend,
        &backend_log,
        CRASH_KILLS,
    );
    let rounds_at_last_kill = qemu.console().matches("ROUND-OK").count();
    let kills_done = started.elapsed();
    let mut stop = [0u8; 512];
    stop[..4].copy_from_slice(b"STOP");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &stop, (CRASH_DISK - 512) as u64).unwrap();
    let console = qemu.finish(GUEST_TIMEOUT);
    drop(backend);

    let rounds: usize = value(&console, "ROUNDS=").parse().unwrap();
    let disk = std::fs::read(&image).unwrap();
    let mut host_bad = bad_blocks(&disk[SOURCE..SOURCE + CHUNKS * CHUNK], &chunks.concat());
    for s in 0..SLOTS.min(rounds) {
        let c: usize = value(&console, &format!("SLOT-{s}=")).parse().unwrap();
        host_bad += bad_blocks(&disk[s * CHUNK..(s + 1) * CHUNK], &chunks[c]);
    }
    eprintln!(
        "crash loop: {CRASH_KILLS} kills ({kills_mid_round} mid-round) in {:.0?}, \
         {reconnects} reconnects + 1, {rounds} rounds ({} after the last kill), \
         {} blocks verified by the guest, {} on the host, total {:.0?}",
        kills_done,
        rounds - rounds_at_last_kill,
        rounds * CHUNK / 4096,
        (CHUNKS + SLOTS.min(rounds)) * CHUNK / 4096,
        started.elapsed()
    );
    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    for (c, chunk) in chunks.iter().enumerate() {
        assert_eq!(value(&console, &format!("CHUNK-{c}=")), sha256(chunk));
    }
    for failure in ["READ-FAIL", "WRITE-FAIL", "VERIFY-FAIL"] {
        assert!(!console.contains(failure), "{failure}:\n{console}");
    }
    assert_eq!(value(&console, "IOERRORS="), "0");
    assert_eq!(value(&console, "FINAL-BAD="), "0");
    assert_eq!(host_bad, 0);
    assert!(rounds > rounds_at_last_kill, "no round after the last kill");
    assert!(rounds >= SLOTS, "only {rounds} rounds");
    assert!(
        kills_mid_round * 2 >= CRASH_KILLS,
        "only {kills_mid_round} of {CRASH_KILLS} kills hit a round"
    );
}
