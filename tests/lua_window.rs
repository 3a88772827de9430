//! The Lua `window(spec, now)` of `src/store/lua/common.lua` against known calendar facts, an
//! independent (deliberately naive) calendar, and the window ends that both stores report.
//!
//! Specs, as `Window::spec` encodes them: `0` lifetime, `s<seconds>` fixed windows aligned to the
//! epoch (`Window::Day` is `s86400`), `m` calendar months in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use support::fresh;
use support::redis_server::RedisServer;
use tower_reserve::{Budget, MemoryStore, RedisStore, Store, Window};

const COMMON: &str = include_str!("../src/store/lua/common.lua");

const DAY_MS: u64 = 86_400_000;

/// Evaluates `window` once per timestamp, in one script call; answers (suffix, end or -1).
async fn lua_windows(
    conn: &mut MultiplexedConnection,
    spec: &str,
    nows: &[u64],
) -> Vec<(String, i64)> {
    let script = format!(
        "{COMMON}\n\
         local out = {{}}\n\
         for i = 2, #ARGV do\n\
           local s, e = window(ARGV[1], tonumber(ARGV[i]))\n\
           out[#out + 1] = {{ s, e or -1 }}\n\
         end\n\
         return out\n"
    );
    let mut answers = Vec::with_capacity(nows.len());
    for chunk in nows.chunks(2_000) {
        let part: Vec<(String, i64)> = redis::cmd("EVAL")
            .arg(&script)
            .arg(0)
            .arg(spec)
            .arg(chunk)
            .query_async(conn)
            .await
            .expect("EVAL window");
        assert_eq!(part.len(), chunk.len());
        answers.extend(part);
    }
    answers
}

/// Evaluates `window` once, exactly as the brief of this test puts it.
async fn lua_window(conn: &mut MultiplexedConnection, spec: &str, now: u64) -> (String, i64) {
    let script = format!(
        "{COMMON}\nlocal s, e = window(ARGV[1], tonumber(ARGV[2]))\nreturn {{ s, e or -1 }}\n"
    );
    redis::cmd("EVAL")
        .arg(script)
        .arg(0)
        .arg(spec)
        .arg(now)
        .query_async(conn)
        .await
        .expect("EVAL window")
}

async fn connect(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Unix seconds of a UTC date and time, from `date -u -d <when> +%s`.
const fn at(unix_seconds: u64) -> u64 {
    unix_seconds * 1000
}

// ---------------------------------------------------------------------------------------------
// A naive calendar: walks month by month from 1970, nothing clever, so it shares no arithmetic
// with Howard Hinnant's algorithms in claim.rs and common.lua.
// ---------------------------------------------------------------------------------------------

fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Every month from January 1970 up to and including December of `last_year`: (year, month,
/// first instant in Unix ms, first instant of the next month).
fn months_until(last_year: u64) -> Vec<(u64, u64, u64, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    for year in 1970..=last_year {
        for month in 1..=12 {
            let end = start + days_in_month(year, month) * DAY_MS;
            out.push((year, month, start, end));
            start = end;
        }
    }
    out
}

/// The naive calendar's month window of `now`: suffix and end.
fn naive_month(now: u64) -> (String, u64) {
    let year_guess = 1970 + now / (365 * DAY_MS) + 1;
    months_until(year_guess)
        .into_iter()
        .find(|&(_, _, start, end)| start <= now && now < end)
        .map(|(y, m, _, end)| (format!(":m{y:04}{m:02}"), end))
        .expect("a month contains every instant")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Known instants, their month windows and the ends of those windows, all from `date -u`.
const MONTH_FACTS: &[(u64, &str, u64)] = &[
    // The epoch.
    (0, ":m197001", at(2_678_400)),
    // 2024-02-10T12:00Z: a leap February ends on 2024-03-01.
    (at(1_707_566_400), ":m202402", at(1_709_251_200)),
    // 2024-02-29T23:59:59.999Z, then 2024-03-01T00:00Z.
    (at(1_709_251_200) - 1, ":m202402", at(1_709_251_200)),
    (at(1_709_251_200), ":m202403", at(1_711_929_600)),
    // 2023-02-15: a common February ends on 2023-03-01.
    (at(1_676_419_200), ":m202302", at(1_677_628_800)),
    // 1999-12-31T23:59:59Z and 2000-01-01: December to January.
    (at(946_684_799), ":m199912", at(946_684_800)),
    (at(946_684_800), ":m200001", at(946_684_800) + 31 * DAY_MS),
    // 2000-02-29T12:00Z: 2000 is a leap year (divisible by 400); its February ends 2000-03-01.
    (at(951_825_600), ":m200002", at(951_868_800)),
    // 2025-12-31T23:59:59Z ends 2026-01-01; 2026-01-01 ends 2026-02-01.
    (at(1_767_225_599), ":m202512", at(1_767_225_600)),
    (at(1_767_225_599) + 999, ":m202512", at(1_767_225_600)),
    (at(1_767_225_600), ":m202601", at(1_769_904_000)),
    // 2100-01-01 ends 2100-02-01. 2100 is not a leap year: 2100-02-28T23:59:59Z ends on
    // 2100-03-01.
    (
        at(4_102_444_800),
        ":m210001",
        at(4_102_444_800) + 31 * DAY_MS,
    ),
    (at(4_107_542_399), ":m210002", at(4_107_542_400)),
    (at(4_107_542_400), ":m210003", at(4_110_220_800)),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_month_windows_match_known_dates() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    for &(now, suffix, end) in MONTH_FACTS {
        assert_eq!(
            lua_window(&mut conn, "m", now).await,
            (suffix.to_owned(), end as i64),
            "month window at {now}"
        );
        // The naive calendar agrees with the same facts, so it can stand in for them below.
        assert_eq!(naive_month(now), (suffix.to_owned(), end), "naive at {now}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_month_windows_match_a_naive_calendar_from_1970_to_2400() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let months = months_until(2400);
    // Per month: its first instant, the one after, the middle and its last instant.
    let mut nows = Vec::new();
    let mut want = Vec::new();
    for &(year, month, start, end) in &months {
        let suffix = format!(":m{year:04}{month:02}");
        for now in [start, start + 1, start + (end - start) / 2, end - 1] {
            nows.push(now);
            want.push((suffix.clone(), end as i64));
        }
    }
    let got = lua_windows(&mut conn, "m", &nows).await;
    for ((now, got), want) in nows.iter().zip(&got).zip(&want) {
        assert_eq!(got, want, "month window at {now}");
    }
    assert_eq!(got.len(), 12 * (2400 - 1970 + 1) * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_fixed_windows_align_to_the_epoch() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;

    // Known answers.
    let facts: &[(&str, u64, &str, i64)] = &[
        ("s60", 125_000, ":s60.2", 180_000),
        ("s60", 0, ":s60.0", 60_000),
        ("s60", 59_999, ":s60.0", 60_000),
        ("s60", 60_000, ":s60.1", 120_000),
        ("s1", 0, ":s1.0", 1_000),
        ("s1", 999, ":s1.0", 1_000),
        ("s1", 1_000, ":s1.1", 2_000),
        ("s1", 1_707_566_400_123, ":s1.1707566400", 1_707_566_401_000),
        ("s86400", 0, ":s86400.0", 86_400_000),
        ("s86400", 86_400_000, ":s86400.1", 172_800_000),
        // 2024-02-10T12:00Z is in day 19763, which ends at 2024-02-11T00:00Z.
        (
            "s86400",
            1_707_566_400_000,
            ":s86400.19763",
            1_707_609_600_000,
        ),
        // 2100-01-01T00:00Z starts day 47482.
        (
            "s86400",
            4_102_444_800_000,
            ":s86400.47482",
            4_102_531_200_000,
        ),
        (
            "s86400",
            4_102_444_799_999,
            ":s86400.47481",
            4_102_444_800_000,
        ),
        // 1 s windows in 2100: an index above 2^32 prints in full.
        ("s1", 4_102_444_800_500, ":s1.4102444800", 4_102_444_801_000),
        // Weeks from the epoch (a Thursday).
        (
            "s604800",
            1_707_566_400_000,
            ":s604800.2823",
            1_707_955_200_000,
        ),
    ];
    for &(spec, now, suffix, end) in facts {
        assert_eq!(
            lua_window(&mut conn, spec, now).await,
            (suffix.to_owned(), end),
            "{spec} at {now}"
        );
    }

    // Many instants around window edges, against integer arithmetic.
    for secs in [1u64, 7, 60, 3_600, 86_400, 604_800] {
        let width = secs * 1000;
        let mut nows = vec![0, 1, width - 1, width, width + 1, 125_000, now_ms()];
        for index in [1u64, 2, 1_000, 19_763 * 86_400 / secs, 4_102_444_800 / secs] {
            let start = index * width;
            nows.extend([start - 1, start, start + 1, start + width / 2]);
        }
        let spec = format!("s{secs}");
        let got = lua_windows(&mut conn, &spec, &nows).await;
        for (now, got) in nows.iter().zip(got) {
            let index = now / width;
            let want = (format!(":s{secs}.{index}"), ((index + 1) * width) as i64);
            assert_eq!(got, want, "{spec} at {now}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_lifetime_has_no_window() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    for now in [0, 1, 1_707_566_400_000, now_ms()] {
        assert_eq!(lua_window(&mut conn, "0", now).await, (String::new(), -1));
    }
}

/// What the naive calendar says the window of `window` containing `now` ends at.
fn expected_end(window: Window, now: u64) -> Option<u64> {
    let fixed = |secs: u64| Some((now / (secs * 1000) + 1) * secs * 1000);
    match window {
        Window::Lifetime => None,
        Window::Month => Some(naive_month(now).1),
        Window::Day => fixed(86_400),
        Window::Every(d) => fixed(d.as_secs()),
        _ => unreachable!("no other window is tested"),
    }
}

/// Both stores report, through the public API, the window end that the naive calendar gives for
/// the current time. A boundary may pass between the calls; then the round is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_report_the_same_window_end_now() {
    let server = RedisServer::start();
    let redis_store = RedisStore::connect(&server.url())
        .await
        .expect("connect to redis");
    let memory = MemoryStore::new();
    let mut conn = connect(&server).await;
    let windows = [
        Window::Lifetime,
        Window::Month,
        Window::Day,
        Window::Every(Duration::from_secs(60)),
        Window::Every(Duration::from_secs(3_600)),
        Window::Every(Duration::from_secs(1)),
    ];
    for window in windows {
        let budget = Budget::new(fresh("window"), 100).per(window);
        let spec = match window {
            Window::Lifetime => "0".to_owned(),
            Window::Month => "m".to_owned(),
            Window::Day => "s86400".to_owned(),
            Window::Every(d) => format!("s{}", d.as_secs()),
            _ => unreachable!("no other window is tested"),
        };
        let mut agreed = false;
        for _ in 0..20 {
            let before = now_ms();
            let from_memory = memory.budget(&budget).await.expect("memory budget");
            let from_redis = redis_store.budget(&budget).await.expect("redis budget");
            let (_, lua_end) = lua_window(&mut conn, &spec, now_ms()).await;
            let after = now_ms();
            let want = expected_end(window, before);
            if want != expected_end(window, after) {
                // A window ended during this round.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(from_memory.resets_at_ms, want, "memory, {window:?}");
            assert_eq!(from_redis.resets_at_ms, want, "redis, {window:?}");
            assert_eq!(
                lua_end,
                want.map_or(-1, |end| end as i64),
                "lua, {window:?}"
            );
            assert_eq!(
                (from_memory.limit, from_memory.spent, from_memory.held),
                (from_redis.limit, from_redis.spent, from_redis.held)
            );
            agreed = true;
            break;
        }
        assert!(agreed, "no round without a window boundary for {window:?}");
    }
}
