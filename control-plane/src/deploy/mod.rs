//! Deployments: the pure strategy state machine ([`machine`]) and the engine
//! that drives it against the registry, persisting every transition before
//! its actions go out.

pub mod current;
pub mod engine;
pub mod machine;
