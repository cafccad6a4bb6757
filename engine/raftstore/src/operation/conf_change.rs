//! Membership changes: not built yet. Replicas are fixed at bootstrap; a committed
//! conf-change entry applies as nothing (`apply`). Joint consensus through raft-rs
//! `ConfChangeV2` (learner → promote → remove), the descriptor's `conf_ver` bumped at
//! apply, lands here, beside its simulation coverage.
