//! Deployments: the pure strategy state machine ([`machine`]), the pure
//! pieces around it (options to a [`spec`], [`pipeline`] stages, the
//! [`timeline`] of events, the [`current`] versions) and the [`engine`]
//! that drives them against the registry, persisting every transition
//! before its actions go out.

pub mod current;
pub mod engine;
pub mod error;
pub mod machine;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod spec;
pub mod timeline;
pub mod trace;
