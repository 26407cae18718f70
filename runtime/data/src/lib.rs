//! virnuc-data (work in progress).
