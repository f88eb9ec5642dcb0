//! Identifier quoting: the only way names reach SQL text.
//!
//! Table and column names come from the agent (and so, ultimately, from the
//! tenant's database), so every one of them is double-quoted with embedded
//! quotes doubled. Values never go into SQL text at all; they are parameters.

pub use crate::pgtext::quote_ident;

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// A comma-separated list of quoted identifiers.
pub fn ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(quote_ident).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled_and_names_kept_verbatim() {
        assert_eq!(quote_ident("plain"), "\"plain\"");
        assert_eq!(quote_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_ident("\"; drop table x; --"), "\"\"\"; drop table x; --\"");
        assert_eq!(qualified("mirror_a", "t\"x"), "\"mirror_a\".\"t\"\"x\"");
        assert_eq!(ident_list(["a", "select"]), "\"a\", \"select\"");
    }
}
