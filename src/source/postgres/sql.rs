//! SQL text helpers. Every identifier the backend writes goes through
//! [`quote_ident`], so table and column names with spaces, capitals, quotes
//! or reserved words (`select`) are safe. Values are parameters, except in
//! `COPY (SELECT …) TO STDOUT`, which takes none: there a cursor's key goes
//! through [`quote_literal`].

pub(crate) use crate::pgtext::quote_ident;

/// `"schema"."name"`.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A string literal: quotes doubled, and the `E''` form (backslashes
/// doubled) when the text holds a backslash, so the result means the same
/// whatever `standard_conforming_strings` says.
pub(crate) fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// The dedicated schema holding the registry, side tables and trigger
/// functions, so ctmirror's objects never mix with the tenant's own.
pub(crate) const CT_SCHEMA: &str = "ctmirror_ct";

/// The side table's own columns. Prefixed so they cannot collide with a
/// primary-key column named `version` or `deleted`, which real tables have.
pub(crate) const VERSION_COL: &str = "ctmirror_version";
pub(crate) const DELETED_COL: &str = "ctmirror_deleted";

/// Wraps a plpgsql body in a dollar quote whose tag does not occur in the
/// body (quoted identifiers may contain `$`).
pub(crate) fn dollar_quote(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = format!("$ctmirror{n}$");
        if !body.contains(&tag) {
            return format!("{tag}{body}{tag}");
        }
        n += 1;
    }
}

/// `"a", "b"` with an optional alias prefix (`s."a", s."b"`).
pub(crate) fn column_list(prefix: Option<&str>, columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| match prefix {
            Some(p) => format!("{p}.{}", quote_ident(c)),
            None => quote_ident(c),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn quote_ident_doubles_embedded_quotes() {
        assert_eq!(quote_ident("Order \"Lines\""), "\"Order \"\"Lines\"\"\"");
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(qualified("my schema", "t"), "\"my schema\".\"t\"");
    }

    #[test]
    fn dollar_quote_avoids_tags_inside_the_body() {
        assert_eq!(dollar_quote("x"), "$ctmirror0$x$ctmirror0$");
        assert_eq!(dollar_quote("a$ctmirror0$b"), "$ctmirror1$a$ctmirror0$b$ctmirror1$");
    }

    #[test]
    fn column_lists_quote_and_prefix() {
        let cols = vec!["a".to_string(), "Mixed Case".to_string()];
        assert_eq!(column_list(Some("s"), &cols), "s.\"a\", s.\"Mixed Case\"");
        assert_eq!(column_list(None, &cols), "\"a\", \"Mixed Case\"");
    }
}
