//! Turns vm.conf text into tokens with 1-based line/column positions.
//!
//! Macros are not expanded here: `$name` becomes a [`Tok::Macro`] and the
//! parser looks it up, because definitions happen while parsing.

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    /// An unquoted word: a keyword or a value.
    Word(String),
    /// A double-quoted string, escapes resolved; never a keyword.
    Str(String),
    /// `$name`, to be expanded by the parser.
    Macro(String),
    LBrace,
    RBrace,
    Comma,
    Semi,
    Eq,
    Newline,
    Eof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LexError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("\"{w}\""),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Macro(m) => format!("${m}"),
            Tok::LBrace => "'{'".into(),
            Tok::RBrace => "'}'".into(),
            Tok::Comma => "','".into(),
            Tok::Semi => "';'".into(),
            Tok::Eq => "'='".into(),
            Tok::Newline => "end of line".into(),
            Tok::Eof => "end of file".into(),
        }
    }
}

/// Characters that end an unquoted word.
fn ends_word(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | ',' | ';' | '=' | '"' | '#')
}

fn is_macro_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

struct Cursor {
    chars: Vec<char>,
    i: usize,
    line: usize,
    col: usize,
}

impl Cursor {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn peek2(&self) -> Option<char> {
        self.chars.get(self.i + 1).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    /// Consumes a backslash-newline (also backslash-CR-LF) if one is next.
    fn continuation(&mut self) -> bool {
        if self.peek() != Some('\\') {
            return false;
        }
        match self.peek2() {
            Some('\n') => {
                self.bump();
                self.bump();
                true
            }
            Some('\r') if self.chars.get(self.i + 2) == Some(&'\n') => {
                self.bump();
                self.bump();
                self.bump();
                true
            }
            _ => false,
        }
    }

    fn err(&self, line: usize, col: usize, message: String) -> LexError {
        LexError { line, col, message }
    }
}

fn control_error(cur: &Cursor, c: char) -> LexError {
    cur.err(
        cur.line,
        cur.col,
        format!("unexpected character U+{:04X}", u32::from(c)),
    )
}

pub(crate) fn lex(text: &str) -> Result<Vec<Token>, LexError> {
    let mut cur = Cursor {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
    };
    let mut out = Vec::new();
    loop {
        if cur.continuation() {
            continue;
        }
        let (line, col) = (cur.line, cur.col);
        let Some(c) = cur.peek() else {
            out.push(Token {
                tok: Tok::Eof,
                line,
                col,
            });
            return Ok(out);
        };
        let single = match c {
            '\n' => Some(Tok::Newline),
            '{' => Some(Tok::LBrace),
            '}' => Some(Tok::RBrace),
            ',' => Some(Tok::Comma),
            ';' => Some(Tok::Semi),
            '=' => Some(Tok::Eq),
            _ => None,
        };
        if let Some(tok) = single {
            cur.bump();
            out.push(Token { tok, line, col });
            continue;
        }
        if c == '#' {
            // The newline itself stays: it ends the statement.
            while cur.peek().is_some_and(|c| c != '\n') {
                cur.bump();
            }
            continue;
        }
        if c == '\t' || c == '\r' || c.is_whitespace() {
            cur.bump();
            continue;
        }
        if c.is_control() {
            return Err(control_error(&cur, c));
        }
        let tok = if c == '"' {
            cur.bump();
            Tok::Str(lex_string(&mut cur, line, col)?)
        } else {
            let macro_ref = c == '$';
            if macro_ref {
                cur.bump();
            }
            let mut word = String::new();
            loop {
                if cur.continuation() {
                    break;
                }
                match cur.peek() {
                    Some(c) if !ends_word(c) => {
                        word.push(c);
                        cur.bump();
                    }
                    _ => break,
                }
            }
            if macro_ref {
                if word.is_empty() || !word.chars().all(is_macro_char) {
                    return Err(cur.err(line, col, format!("invalid macro reference \"${word}\"")));
                }
                Tok::Macro(word)
            } else {
                Tok::Word(word)
            }
        };
        out.push(Token { tok, line, col });
    }
}

/// Reads the rest of a quoted string whose `"` started at line/col.
fn lex_string(cur: &mut Cursor, line: usize, col: usize) -> Result<String, LexError> {
    let mut s = String::new();
    loop {
        if cur.continuation() {
            continue;
        }
        match cur.peek() {
            None | Some('\n') => {
                return Err(cur.err(line, col, "unterminated quoted string".into()));
            }
            Some('"') => {
                cur.bump();
                return Ok(s);
            }
            Some('\\') => {
                let (el, ec) = (cur.line, cur.col);
                cur.bump();
                let e = match cur.peek() {
                    Some('"') => '"',
                    Some('\\') => '\\',
                    Some('n') => '\n',
                    Some('t') => '\t',
                    Some(other) if !other.is_control() => {
                        return Err(cur.err(
                            el,
                            ec,
                            format!("unknown escape \"\\{other}\" in string"),
                        ));
                    }
                    _ => return Err(cur.err(el, ec, "unknown escape in string".into())),
                };
                cur.bump();
                s.push(e);
            }
            Some(c) if c.is_control() && c != '\t' => return Err(control_error(cur, c)),
            Some(c) => {
                cur.bump();
                s.push(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        lex(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn words_strings_macros_and_punctuation() {
        assert_eq!(
            toks("vm \"a b\" { memory $m; }, = # c\n"),
            vec![
                Tok::Word("vm".into()),
                Tok::Str("a b".into()),
                Tok::LBrace,
                Tok::Word("memory".into()),
                Tok::Macro("m".into()),
                Tok::Semi,
                Tok::RBrace,
                Tok::Comma,
                Tok::Eq,
                Tok::Newline,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn continuation_joins_lines_and_positions_stay_true() {
        let t = lex("disk \\\n  \"/x\"").unwrap();
        assert_eq!(t[1].tok, Tok::Str("/x".into()));
        assert_eq!((t[1].line, t[1].col), (2, 3));
        assert_eq!(toks("\"a\\\nb\""), vec![Tok::Str("ab".into()), Tok::Eof]);
    }

    #[test]
    fn escapes_and_errors() {
        assert_eq!(
            toks(r#""q\"\\\n\t""#),
            vec![Tok::Str("q\"\\\n\t".into()), Tok::Eof]
        );
        let e = lex("x \"abc").unwrap_err();
        assert_eq!((e.line, e.col), (1, 3));
        let e = lex("\"a\\q\"").unwrap_err();
        assert_eq!(
            (e.col, e.message.as_str()),
            (3, "unknown escape \"\\q\" in string")
        );
        let e = lex("$").unwrap_err();
        assert_eq!(e.message, "invalid macro reference \"$\"");
        assert!(lex("a\u{1}").is_err());
    }
}
