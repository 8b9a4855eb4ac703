//! `/v1/images`: build, import, bootstrap, list.
