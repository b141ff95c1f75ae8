//! Logging: `tracing` with text or JSON lines; every request line carries its request id
//! (from the `x-request-id` span field set in `startup`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber (once; later calls are ignored, which suits tests), and
/// a panic hook that logs through it: a panic that is caught (fhirbolt's on some malformed
/// input, a handler's by `rejection`) becomes one log line with the request id and, in JSON
/// format, one JSON object, rather than free text on stderr.
pub fn init(settings: &LogSettings) {
    std::panic::set_hook(Box::new(|info| {
        if fhir_model::panic_is_expected() {
            // fhirbolt on malformed input: the client gets a 400; no backtrace, no alarm.
            tracing::debug!(panic = %info, "fhirbolt panicked on malformed input (caught)");
            return;
        }
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!(panic = %info, backtrace = %backtrace, "panic");
    }));
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
