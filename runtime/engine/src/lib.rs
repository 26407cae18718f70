//! virnuc-engine (work in progress).
