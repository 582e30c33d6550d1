//! Progress for people: indicatif bars and spinners on a terminal, nothing otherwise, so
//! that JSON output, pipes and logs stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Whether progress may be drawn: stderr is a terminal and CI is not set.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// A bar of `len` units (hidden when progress is not [`enabled`]).
pub fn bar(len: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target());
    let style = ProgressStyle::with_template("{msg:<28} [{bar:32}] {human_pos}/{human_len} ({rate}, eta {eta})")
        .expect("a valid template")
        .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", state.per_sec());
        })
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message.into());
    bar
}

/// A bar over `len` bytes, with a message that the caller keeps current (hidden when
/// progress is not [`enabled`]).
pub fn bytes_bar(len: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target());
    let style = ProgressStyle::with_template("[{bar:32}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}").expect("a valid template").progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message.into());
    bar
}

/// A spinner for work of unknown length, ticking by itself (hidden when not [`enabled`]).
pub fn spinner(message: impl Into<String>) -> ProgressBar {
    let spinner = ProgressBar::with_draw_target(None, target());
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    spinner.set_message(message.into());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

fn target() -> ProgressDrawTarget {
    if enabled() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}
