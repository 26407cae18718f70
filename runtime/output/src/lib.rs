//! virnuc-output (work in progress).
