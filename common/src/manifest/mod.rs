//! The module manifest (`module.toml`): parsing it into a validated
//! [`Manifest`], and expanding the `${NODE_NAME}`, `${NODE_LABEL_<key>}` and
//! `${MODULE_DIR}` variables its values may contain.
//!
//! Validation happens once, at parse time, so that a bad manifest is rejected
//! when it is published rather than on every node at deploy time. Values that
//! contain variables are checked for syntax here but stored unexpanded: only a
//! node knows its name, labels and module directory, so it calls [`expand`].
//!
//! `types` holds what a manifest says, `parse` turns TOML into it with
//! errors that name the dotted key, and `vars` checks and expands the
//! variables; everything public is re-exported here.

mod parse;
mod types;
mod vars;

pub use parse::{format_size, load_manifest, parse_manifest, parse_size, valid_module_name};
pub use types::{
    BundleSpec, HealthCheck, HealthSpec, MANIFEST_FILE, Manifest, ManifestError, MetricsSpec,
    ProcessSpec, Runtime, SocketSpec, StopSignal, SwapStrategy, WasmSpec,
};
pub use vars::{Vars, expand};
