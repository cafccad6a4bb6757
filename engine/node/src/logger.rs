//! raft-rs logs through slog; this drain forwards its records to `tracing`.

use rangekv_types::RangeId;

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        let mut fields = String::new();
        let mut serializer = FieldWriter(&mut fields);
        let _ = slog::KV::serialize(values, record, &mut serializer);
        let _ = slog::KV::serialize(&record.kv(), record, &mut serializer);
        let message = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{message}{fields}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}{fields}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{message}{fields}"),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::trace!(target: "raft", "{message}{fields}")
            }
        }
        Ok(())
    }
}

struct FieldWriter<'a>(&'a mut String);

impl slog::Serializer for FieldWriter<'_> {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

/// The logger of one range's `RawNode`.
pub fn raft_logger(range: RangeId) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("range" => range.get()))
}
