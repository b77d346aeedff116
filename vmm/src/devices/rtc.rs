//! The PC CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71
//! (data), showing the host's time. No crate covers it: `vm-superio` only
//! has the Arm PL031.
//!
//! The time is computed from the host's real-time clock at every read, so
//! it never drifts and there is no update cycle: status register A never
//! shows UIP. A guest that sets the clock moves an offset from host time;
//! while it holds status register B's SET bit the time stands still and
//! its writes edit that frozen copy, applied when SET clears (Linux's
//! `mc146818_set_time` works this way). Register B's binary/BCD and
//! 12/24-hour bits are honoured. The alarm, periodic and update interrupts
//! are not emulated: register C never shows a flag. The other bytes of the
//! 128 are plain NVRAM.
//!
//! Saved state ([`RtcState`]) keeps the guest's offset from host time, not
//! the time it read: like a battery-backed clock, a restored RTC counts the
//! time the VM spent saved and reads correct wall-clock time (plus whatever
//! the guest set) on any host whose clock is right.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bus::BusDevice;

/// The index and data ports.
pub const RTC_BASE: u64 = 0x70;
pub const RTC_LEN: u64 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century byte, as QEMU and the FADT's CENTURY field place it.
pub const CENTURY: u8 = 0x32;

/// Register A: update in progress (read-only), and the power-on divider
/// (32.768 kHz time base) and rate (1024 Hz) bits.
const A_UIP: u8 = 0x80;
const A_DEFAULT: u8 = 0x26;
/// Register B: SET halts the clock; DM = binary, not BCD; 24-hour mode.
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time (the battery is good).
const D_VRT: u8 = 0x80;
/// The index register's bit 7 masks NMIs on a PC; the index is the rest.
const INDEX_MASK: u8 = 0x7f;

/// Seconds since the Unix epoch, UTC.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// The host's real-time clock (`clock_gettime(CLOCK_REALTIME)`).
pub fn host_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// CMOS bytes, NVRAM included.
const CMOS_LEN: usize = 128;

/// Errors restoring the RTC from saved state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RtcError {
    #[error("Saved CMOS holds {0} bytes, not {CMOS_LEN}")]
    CmosSize(usize),
    #[error("Saved time is out of range: offset {offset} s, year being set {year:?}")]
    TimeRange { offset: i64, year: Option<i64> },
}

/// The farthest a guest can put the clock: four BCD digits of year (0x99
/// in each register reads as 165) are about 16,700 years. A saved offset
/// or frozen year beyond this bound is corrupt, and its time arithmetic
/// would overflow.
const MAX_YEARS: i64 = 1_000_000;
const MAX_OFFSET: i64 = MAX_YEARS * 366 * 86_400;

/// A broken-down UTC time. Fields hold whatever a guest wrote (a month of
/// 0x99 included); conversion to seconds normalises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

/// What the RTC holds, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The register the data port reaches (the guest may save between
    /// writing the index and using the data port).
    pub index: u8,
    /// All 128 CMOS bytes: status registers A and B, NVRAM. The time bytes
    /// are not used (the time comes from the clock and `offset`).
    pub cmos: Vec<u8>,
    /// Guest time minus host time, in seconds: 0 unless the guest set the
    /// clock.
    pub offset: i64,
    /// The time being edited while register B's SET bit is held, exactly
    /// as written so far.
    pub frozen: Option<DateTime>,
}

impl DateTime {
    fn from_epoch(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    fn to_epoch(self) -> i64 {
        let m = i64::from(self.month) - 1;
        let days = days_from_civil(self.year + m.div_euclid(12), m.rem_euclid(12) as u8 + 1)
            + i64::from(self.day)
            - 1;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    fn day_of_week(self) -> u8 {
        // 1970-01-01 was a Thursday.
        (self.to_epoch().div_euclid(86_400) + 4).rem_euclid(7) as u8 + 1
    }
}

/// Days since 1970-01-01 of the first day of `month` (1..=12) of `year`
/// (proleptic Gregorian; H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The CMOS RTC and its NVRAM.
pub struct Rtc {
    clock: Clock,
    index: u8,
    cmos: [u8; CMOS_LEN],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The time being edited while register B's SET bit is held.
    frozen: Option<DateTime>,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(Box::new(host_clock))
    }
}

impl Rtc {
    /// An RTC on the host's clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An RTC on `clock` (tests use a fake one).
    pub fn with_clock(clock: Clock) -> Self {
        let mut cmos = [0u8; CMOS_LEN];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24H;
        Self {
            clock,
            index: 0,
            cmos,
            offset: 0,
            frozen: None,
        }
    }

    /// The RTC's state, for a snapshot.
    pub fn state(&self) -> RtcState {
        RtcState {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset: self.offset,
            frozen: self.frozen,
        }
    }

    /// An RTC on `clock` (normally [`host_clock`]) that carries on from
    /// `state`: it reads `clock` plus the saved offset, so the time the VM
    /// spent saved has passed for it, as for a battery-backed clock.
    pub fn restore(state: &RtcState, clock: Clock) -> Result<Self, RtcError> {
        let cmos = state
            .cmos
            .as_slice()
            .try_into()
            .map_err(|_| RtcError::CmosSize(state.cmos.len()))?;
        let year = state.frozen.map(|f| f.year);
        if state.offset.unsigned_abs() > MAX_OFFSET.unsigned_abs()
            || year.is_some_and(|y| y.unsigned_abs() > MAX_YEARS.unsigned_abs())
        {
            return Err(RtcError::TimeRange {
                offset: state.offset,
                year,
            });
        }
        Ok(Self {
            clock,
            index: state.index & INDEX_MASK,
            cmos,
            offset: state.offset,
            frozen: state.frozen,
        })
    }

    fn now(&self) -> DateTime {
        self.frozen
            .unwrap_or_else(|| DateTime::from_epoch((self.clock)().saturating_add(self.offset)))
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn encode(&self, v: u8) -> u8 {
        let v = v % 100;
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.decode(v);
        }
        let pm = if v & 0x80 != 0 { 12 } else { 0 };
        self.decode(v & 0x7f) % 12 + pm
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            DAY_OF_WEEK => self.encode(t.day_of_week()),
            DAY_OF_MONTH => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            REG_A => self.cmos[usize::from(REG_A)] & !A_UIP,
            // No interrupt flags are ever raised.
            REG_C => 0,
            REG_D => D_VRT,
            r => self.cmos[usize::from(r & INDEX_MASK)],
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        let mut t = self.now();
        match reg {
            SECONDS => t.second = self.decode(v),
            MINUTES => t.minute = self.decode(v),
            HOURS => t.hour = self.decode_hour(v),
            DAY_OF_MONTH => t.day = self.decode(v),
            MONTH => t.month = self.decode(v),
            YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(v)),
            CENTURY => t.year = i64::from(self.decode(v)) * 100 + t.year.rem_euclid(100),
            // Derived from the date.
            DAY_OF_WEEK => return,
            REG_A => {
                self.cmos[usize::from(REG_A)] = v & !A_UIP;
                return;
            }
            REG_B => {
                let was_set = self.reg_b() & B_SET != 0;
                self.cmos[usize::from(REG_B)] = v;
                match (was_set, v & B_SET != 0) {
                    (false, true) => self.frozen = Some(t),
                    (true, false) => self.set_time(t),
                    _ => {}
                }
                return;
            }
            REG_C | REG_D => return,
            r => {
                self.cmos[usize::from(r & INDEX_MASK)] = v;
                return;
            }
        }
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.set_time(t);
        }
    }

    /// Makes the guest's clock read `t` from now on.
    fn set_time(&mut self, t: DateTime) {
        self.frozen = None;
        self.offset = t.to_epoch() - (self.clock)();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, b) in (offset..).zip(data.iter_mut()) {
            // The index port is write-only.
            *b = match port {
                1 => self.read_reg(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &b) in (offset..).zip(data) {
            match port {
                0 => self.index = b & INDEX_MASK,
                1 => self.write_reg(self.index, b),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_DAY_EVE: i64 = 1_709_251_198;

    fn fake_clock(start: i64) -> (Rtc, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(start));
        let c = now.clone();
        (
            Rtc::with_clock(Box::new(move || c.load(Ordering::Relaxed))),
            now,
        )
    }

    fn get(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn set(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.write(0, &[reg]);
        rtc.write(1, &[v]);
    }

    /// (year, month, day, hour, minute, second) read as Linux does.
    fn read_time(rtc: &mut Rtc) -> [u8; 7] {
        [CENTURY, YEAR, MONTH, DAY_OF_MONTH, HOURS, MINUTES, SECONDS].map(|r| get(rtc, r))
    }

    /// The host's broken-down UTC time from libc, as the oracle.
    fn libc_gmtime(secs: i64) -> libc::tm {
        // SAFETY: all-zero is a valid `tm` (integers and a null pointer).
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call; gmtime_r is reentrant.
        let r = unsafe { libc::gmtime_r(&secs, &mut tm) };
        assert!(!r.is_null());
        tm
    }

    fn bcd(v: i32) -> u8 {
        (((v / 10) << 4) | (v % 10)) as u8
    }

    #[test]
    fn reads_the_hosts_current_utc_time_in_bcd() {
        let mut rtc = Rtc::new();
        let before = host_clock();

        let time = read_time(&mut rtc);

        let tm = libc_gmtime(before);
        let year = tm.tm_year + 1900;
        assert_eq!(
            time[..4],
            [
                bcd(year / 100),
                bcd(year % 100),
                bcd(tm.tm_mon + 1),
                bcd(tm.tm_mday)
            ]
        );
        let secs_of_day = |h: u8, m: u8, s: u8| {
            let d = |v: u8| i64::from((v >> 4) * 10 + (v & 0xf));
            d(h) * 3600 + d(m) * 60 + d(s)
        };
        let read = secs_of_day(time[4], time[5], time[6]);
        let expected = i64::from(tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec);
        assert!((read - expected).abs() <= 2, "{read} vs {expected}");
    }

    #[test]
    fn civil_conversion_matches_libc_gmtime() {
        let samples = [0, 951_782_400, LEAP_DAY_EVE, 4_102_444_800, 1_234_567_890];

        let ours = samples.map(|s| {
            let t = DateTime::from_epoch(s);
            (
                t.year,
                t.month,
                t.day,
                t.hour,
                t.minute,
                t.second,
                t.day_of_week(),
            )
        });

        let theirs = samples.map(|s| {
            let tm = libc_gmtime(s);
            (
                i64::from(tm.tm_year) + 1900,
                (tm.tm_mon + 1) as u8,
                tm.tm_mday as u8,
                tm.tm_hour as u8,
                tm.tm_min as u8,
                tm.tm_sec as u8,
                tm.tm_wday as u8 + 1,
            )
        });
        assert_eq!(ours, theirs);
        assert_eq!(samples.map(|s| DateTime::from_epoch(s).to_epoch()), samples);
    }

    #[test]
    fn binary_mode_reads_plain_numbers() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);

        set(&mut rtc, REG_B, B_24H | B_BINARY);

        assert_eq!(read_time(&mut rtc), [20, 24, 2, 29, 23, 59, 58]);
        assert_eq!(get(&mut rtc, DAY_OF_WEEK), 5);
    }

    #[test]
    fn twelve_hour_mode_sets_the_pm_bit() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);

        set(&mut rtc, REG_B, 0);

        assert_eq!(get(&mut rtc, HOURS), 0x80 | 0x11);
    }

    #[test]
    fn a_guest_set_time_moves_with_the_host_clock() {
        let (mut rtc, now) = fake_clock(LEAP_DAY_EVE);
        set(&mut rtc, REG_B, B_24H | B_SET);
        for (reg, v) in [(YEAR, 0x99), (MONTH, 0x12), (DAY_OF_MONTH, 0x31)] {
            set(&mut rtc, reg, v);
        }
        for (reg, v) in [
            (HOURS, 0x23),
            (MINUTES, 0x59),
            (SECONDS, 0x30),
            (CENTURY, 0x19),
        ] {
            set(&mut rtc, reg, v);
        }
        set(&mut rtc, REG_B, B_24H);

        now.fetch_add(45, Ordering::Relaxed);

        assert_eq!(
            read_time(&mut rtc),
            [0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x15]
        );
    }

    #[test]
    fn time_stands_still_while_set_is_held() {
        let (mut rtc, now) = fake_clock(LEAP_DAY_EVE);
        set(&mut rtc, REG_B, B_24H | B_SET);

        now.fetch_add(10, Ordering::Relaxed);

        assert_eq!(get(&mut rtc, SECONDS), 0x58);
    }

    #[test]
    fn a_single_field_write_keeps_the_rest_of_the_time() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);

        set(&mut rtc, MINUTES, 0x15);

        assert_eq!(
            read_time(&mut rtc),
            [0x20, 0x24, 0x02, 0x29, 0x23, 0x15, 0x58]
        );
    }

    #[test]
    fn index_register_ignores_the_nmi_mask_bit() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);

        rtc.write(0, &[0x80 | SECONDS]);
        let mut b = [0u8];
        rtc.read(1, &mut b);

        assert_eq!(b, [0x58]);
    }

    #[test]
    fn status_registers_show_a_valid_idle_clock() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);

        set(&mut rtc, REG_A, 0xff);
        set(&mut rtc, REG_D, 0);

        assert_eq!(
            [REG_A, REG_B, REG_C, REG_D].map(|r| get(&mut rtc, r)),
            [0x7f, B_24H, 0, D_VRT]
        );
    }

    #[test]
    fn nvram_keeps_what_the_guest_writes() {
        let (mut rtc, _) = fake_clock(0);

        set(&mut rtc, 0x7f, 0xa5);
        set(&mut rtc, 0x0e, 0x5a);

        assert_eq!([get(&mut rtc, 0x7f), get(&mut rtc, 0x0e)], [0xa5, 0x5a]);
    }

    /// An RTC restored from `rtc`'s state, on a fake clock at `now`.
    fn restored(rtc: &Rtc, now: i64) -> (Rtc, Arc<AtomicI64>) {
        let clock = Arc::new(AtomicI64::new(now));
        let c = clock.clone();
        let r = Rtc::restore(&rtc.state(), Box::new(move || c.load(Ordering::Relaxed))).unwrap();
        (r, clock)
    }

    #[test]
    fn restored_at_the_same_instant_reads_the_same_time() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);
        set(&mut rtc, REG_B, B_24H | B_BINARY);
        set(&mut rtc, YEAR, 7);

        let (mut r, _) = restored(&rtc, LEAP_DAY_EVE);

        assert_eq!(read_time(&mut r), read_time(&mut rtc));
        assert_eq!(get(&mut r, REG_B), B_24H | B_BINARY);
    }

    #[test]
    fn restored_clock_keeps_the_guest_offset_and_counts_time_saved() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);
        set(&mut rtc, HOURS, 0x10);
        let (mut r, _) = restored(&rtc, LEAP_DAY_EVE + 100);

        let time = read_time(&mut r);

        // 2024-02-29 10:59:58 + 100 s.
        assert_eq!(time, [0x20, 0x24, 0x02, 0x29, 0x11, 0x01, 0x38]);
    }

    #[test]
    fn restored_clock_finishes_a_half_done_set() {
        let (mut rtc, _) = fake_clock(LEAP_DAY_EVE);
        set(&mut rtc, REG_B, B_24H | B_SET);
        set(&mut rtc, YEAR, 0x30);
        set(&mut rtc, MONTH, 0x99);
        let (mut r, now) = restored(&rtc, LEAP_DAY_EVE + 50);

        let while_set = get(&mut r, MONTH);
        set(&mut r, MONTH, 0x06);
        set(&mut r, REG_B, B_24H);
        now.fetch_add(1, Ordering::Relaxed);

        assert_eq!(while_set, 0x99);
        assert_eq!(
            read_time(&mut r),
            [0x20, 0x30, 0x06, 0x29, 0x23, 0x59, 0x59]
        );
    }

    #[test]
    fn restored_rtc_keeps_nvram_and_the_selected_index() {
        let (mut rtc, _) = fake_clock(0);
        set(&mut rtc, 0x40, 0xa5);
        rtc.write(0, &[0x40]);
        let (mut r, _) = restored(&rtc, 0);

        let mut b = [0u8];
        r.read(1, &mut b);

        assert_eq!(b, [0xa5]);
    }

    #[test]
    fn saved_time_no_guest_could_set_is_refused() {
        let (mut rtc, _) = fake_clock(0);
        set(&mut rtc, REG_B, B_24H | B_SET);
        let mut far_year = rtc.state();
        far_year.frozen.as_mut().unwrap().year = i64::MAX / 2;
        let mut far_offset = rtc.state();
        far_offset.offset = i64::MIN;

        let errs = [far_year, far_offset].map(|s| Rtc::restore(&s, Box::new(|| 0)).err());

        assert_eq!(
            errs,
            [
                Some(RtcError::TimeRange {
                    offset: 0,
                    year: Some(i64::MAX / 2)
                }),
                Some(RtcError::TimeRange {
                    offset: i64::MIN,
                    year: Some(1970)
                }),
            ]
        );
    }

    #[test]
    fn saved_cmos_of_the_wrong_size_is_refused() {
        let (rtc, _) = fake_clock(0);
        let mut state = rtc.state();
        state.cmos.truncate(64);

        let err = Rtc::restore(&state, Box::new(|| 0)).err();

        assert_eq!(err, Some(RtcError::CmosSize(64)));
    }
}
