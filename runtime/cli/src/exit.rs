//! Exit status of every subcommand: one small scheme, so a script or CI job can tell a regression
//! from a broken runner.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success (`gate`: passed); also when the reader of standard output went away |
//! | 1 | `gate` ran and the candidate failed it |
//! | 2 | usage: a flag, a value out of its range, a run config |
//! | 3 | input: an input file cannot be read or parsed, or differs from the one a `--resume` continues |
//! | 4 | output: the output, its working folder or the report cannot be written (exists, in use, disk full) |
//! | 5 | model or engine: model/metadata/engine folder invalid, ONNX Runtime or the provider failed |
//! | 6 | any other error (a bug: please report it) |
//! | 130, 143 | stopped by SIGINT, SIGTERM (128 + signal number) |

use virnuc_data::DataError;
use virnuc_engine::EngineError;
use virnuc_gate::GateError;
use virnuc_output::OutputError;

use crate::gate_cmd::GateFailed;
use crate::settings::UsageError;

pub const SUCCESS: u8 = 0;
pub const GATE_FAILED: u8 = 1;
pub const USAGE: u8 = 2;
pub const INPUT: u8 = 3;
pub const OUTPUT: u8 = 4;
pub const ENGINE: u8 = 5;
pub const OTHER: u8 = 6;
pub const SIGINT: u8 = 130;
pub const SIGTERM: u8 = 143;

/// The run was stopped by a signal (SIGINT or SIGTERM); carries the signal number.
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            2 => "SIGINT",
            15 => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "stopped by {name}")
    }
}

impl std::error::Error for Interrupted {}

/// An input error found by the command itself (not by a library): exit status 3.
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// An output error found by the command itself (the report path, a write): exit status 4.
/// The engines could not run (every device worker of a `--devices` run died): exit 5.
#[derive(Debug)]
pub struct EngineFailure(pub String);

impl std::fmt::Display for EngineFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EngineFailure {}

#[derive(Debug)]
pub struct OutputFailure(pub String);

impl std::fmt::Display for OutputFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutputFailure {}

fn data_class(e: &DataError) -> u8 {
    match e {
        DataError::Config(_) => USAGE,
        DataError::Panic(_) => OTHER,
        DataError::Open { .. }
        | DataError::Record { .. }
        | DataError::RunFailed { .. }
        | DataError::InputChanged { .. }
        | DataError::Mode { .. }
        | DataError::Encode { .. } => INPUT,
        // The model's tokenizer file.
        DataError::Tokenizer { .. } => ENGINE,
    }
}

fn output_class(e: &OutputError) -> u8 {
    match e {
        // `merge`'s parts are its input: a part that is not one, parts of different runs, a
        // shard missing or given twice.
        OutputError::InputChanged { .. }
        | OutputError::NotAPart { .. }
        | OutputError::PartsDiffer { .. }
        | OutputError::ShardTwice { .. }
        | OutputError::ShardsMissing { .. }
        | OutputError::PartOrder { .. } => INPUT,
        OutputError::InvalidConfig { .. } => USAGE,
        OutputError::Internal(_) => OTHER,
        _ => OUTPUT,
    }
}

/// The status for an error: the most specific cause in its chain, outermost first.
pub fn code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(i) = cause.downcast_ref::<Interrupted>() {
            return if i.0 == 2 { SIGINT } else { SIGTERM };
        }
        if cause.is::<UsageError>() {
            return USAGE;
        }
        if cause.is::<GateFailed>() {
            return GATE_FAILED;
        }
        if cause.is::<InputError>() {
            return INPUT;
        }
        if cause.is::<EngineFailure>() {
            return ENGINE;
        }
        if cause.is::<OutputFailure>() {
            return OUTPUT;
        }
        if let Some(d) = cause.downcast_ref::<DataError>() {
            return data_class(d);
        }
        if let Some(o) = cause.downcast_ref::<OutputError>() {
            return output_class(o);
        }
        if cause.is::<EngineError>() {
            return ENGINE;
        }
        if let Some(g) = cause.downcast_ref::<GateError>() {
            return match g {
                GateError::Data(d) => data_class(d),
                GateError::Thresholds { .. } => USAGE,
                GateError::Engine(_) | GateError::Mismatch(_) => ENGINE,
            };
        }
    }
    // A bare I/O error (standard output, a file the command writes itself) is an output error.
    if e.chain().any(|c| c.is::<std::io::Error>()) {
        return OUTPUT;
    }
    OTHER
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_most_specific_cause_decides() {
        let usage: anyhow::Error = UsageError("x".into()).into();
        assert_eq!(code_of(&usage.context("while starting")), USAGE);
        let input = anyhow::Error::new(DataError::Open {
            file: "a.fa".into(),
            message: "no such file".into(),
        })
        .context("reading the input failed");
        assert_eq!(code_of(&input), INPUT);
        let engine = anyhow::Error::new(EngineError::Model("bad".into()));
        assert_eq!(code_of(&engine), ENGINE);
        let gate: anyhow::Error = GateFailed("min cosine".into()).into();
        assert_eq!(code_of(&gate), GATE_FAILED);
        let gate_error = anyhow::Error::new(GateError::Engine(EngineError::Model("m".into())));
        assert_eq!(code_of(&gate_error), ENGINE);
        let io: Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
        let io = io.context("cannot write x").expect_err("error");
        assert_eq!(code_of(&io), OUTPUT);
        assert_eq!(code_of(&Interrupted(15).into()), SIGTERM);
        assert_eq!(code_of(&Interrupted(2).into()), SIGINT);
        assert_eq!(code_of(&anyhow::anyhow!("something else")), OTHER);
    }
}
