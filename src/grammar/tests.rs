//! The masks against a brute-force check of every token: for a grammar whose language is a
//! finite list of strings, a token is allowed exactly when the text so far plus its bytes is
//! a prefix of one of them, and EOS exactly when the text so far is one of them. That holds
//! exactly when llguidance does not force canonical tokenizations; when it does (as with the
//! model's tokenizer), where the grammar forces the next bytes it allows only the first token
//! of their tokenization, a subset of the brute-force set, never empty.

use super::vocabulary::env_of_words;
use super::*;

const EOS: u32 = 0;

/// EOS, every printable ASCII byte, and some multi-byte tokens that straddle the strings'
/// boundaries; `PAD` rows of padding follow, as in a padded vocabulary.
fn words() -> Vec<Vec<u8>> {
    let mut w = vec![b"\xff<eos>".to_vec()];
    w.extend((0x20u8..0x7f).map(|b| vec![b]));
    for t in ["ab", "abc", "cd", "-1", "ye", "yes", "no", "may", "maybe", "be", "12", "123", "x1", "{\"", "\":", "\"}"]
    {
        w.push(t.as_bytes().to_vec());
    }
    w
}

const PAD: usize = 7;

fn grammars() -> (ParserFactory, usize) {
    grammars_with(false)
}

fn grammars_with(canonical: bool) -> (ParserFactory, usize) {
    let w = words();
    let width = w.len() + PAD;
    (factory(&env_of_words(w, width, &[EOS], canonical)).expect("factory"), width)
}

fn allowed(matcher: &mut TokenMatcher, width: usize) -> Vec<bool> {
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    matcher.fill_mask(&mut mask).expect("a mask");
    (0..width).map(|t| mask[t / 32] >> (t % 32) & 1 == 1).collect()
}

/// Walks every path of allowed tokens, comparing each mask with the brute-force one: equal,
/// or (canonical) a non-empty subset of it.
fn check_finite_language(constraint: Constraint, language: &[&str]) {
    check_language(constraint.clone(), language, false);
    check_language(constraint, language, true);
}

fn check_language(constraint: Constraint, language: &[&str], canonical: bool) {
    let (factory, width) = grammars_with(canonical);
    let w = words();
    let matcher = compile(&factory, &constraint, "test", &[EOS]).expect("compiles");
    let mut stack = vec![(matcher, Vec::<u8>::new())];
    let mut checked = 0;
    while let Some((mut m, text)) = stack.pop() {
        let got = allowed(&mut m, width);
        for t in 0..width {
            let want = if t as u32 == EOS {
                language.iter().any(|s| s.as_bytes() == text)
            } else {
                let next = [&text[..], w.get(t).map_or(&[][..], |b| &b[..])].concat();
                t < w.len() && language.iter().any(|s| s.as_bytes().starts_with(&next))
            };
            let what =
                || format!("{constraint:?} after {:?}: token {t} {:?}", String::from_utf8_lossy(&text), w.get(t));
            match canonical {
                false => assert_eq!(got[t], want, "{}", what()),
                true => assert!(want || !got[t], "allowed outside the language: {}", what()),
            }
            if got[t] && t as u32 != EOS {
                let mut next = m.clone();
                next.commit(t as u32).expect("an allowed token commits");
                stack.push((next, [&text[..], &w[t][..]].concat()));
            }
        }
        assert!(got.iter().any(|&a| a), "{constraint:?}: an empty mask after {:?}", String::from_utf8_lossy(&text));
        checked += 1;
    }
    assert!(checked > language.len(), "{checked} states walked");
}

#[test]
fn choice_masks_match_brute_force() {
    check_finite_language(Constraint::Choice(vec!["yes".into(), "no".into(), "maybe".into()]), &["yes", "no", "maybe"]);
}

#[test]
fn regex_masks_match_brute_force() {
    let mut language = Vec::new();
    for a in ["ab", "cd"] {
        for b in ["", "ab", "cd"] {
            for d in ["0", "1", "2"] {
                language.push(format!("{a}{b}-{d}"));
            }
        }
    }
    let language: Vec<&str> = language.iter().map(String::as_str).collect();
    check_finite_language(Constraint::Regex("(ab|cd){1,2}-[0-2]".into()), &language);
}

#[test]
fn lark_masks_match_brute_force() {
    let lark = "start: \"x\" num | \"{\\\"\" num \"\\\"}\"\nnum: \"1\" | \"12\" | \"123\"";
    check_finite_language(Constraint::Lark(lark.into()), &["x1", "x12", "x123", "{\"1\"}", "{\"12\"}", "{\"123\"}"]);
}

/// A JSON schema's masks, followed at random, always produce JSON valid under it.
#[test]
fn random_walks_under_a_json_schema_give_valid_json() {
    let (factory, width) = grammars();
    let w = words();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 200}, "b": {"enum": ["yes", "no"]}},
        "required": ["a", "b"],
        "additionalProperties": false
    });
    let matcher = compile(&factory, &Constraint::JsonSchema(schema), "test", &[EOS]).expect("compiles");
    let mut state = 1u64;
    for walk in 0..30 {
        let mut m = matcher.clone();
        let mut text = Vec::new();
        for _ in 0..200 {
            let ok: Vec<usize> =
                allowed(&mut m, width).iter().enumerate().filter(|(_, &a)| a).map(|(t, _)| t).collect();
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let t = ok[(state >> 33) as usize % ok.len()];
            if t as u32 == EOS {
                break;
            }
            m.commit(t as u32).expect("commits");
            text.extend_from_slice(&w[t]);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&text).unwrap_or_else(|e| panic!("walk {walk}: {e}: {text:?}"));
        let a = v["a"].as_i64().unwrap_or(-1);
        assert!((0..=200).contains(&a), "walk {walk}: {v}");
        assert!(v["b"] == "yes" || v["b"] == "no", "walk {walk}: {v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "walk {walk}: {v}");
    }
}

#[test]
fn padded_rows_and_rows_past_the_logits_stay_masked() {
    let (factory, width) = grammars();
    // Any printable text: every real token but EOS is allowed at the start.
    let mut m = compile(&factory, &Constraint::Regex("[ -~]*".into()), "test", &[EOS]).expect("compiles");
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    m.fill_mask(&mut mask).expect("a mask");
    let n = words().len();
    for t in 0..mask.len() * 32 {
        let bit = mask[t / 32] >> (t % 32) & 1 == 1;
        assert_eq!(bit, (1..n).contains(&t) || t == EOS as usize, "row {t}");
    }
}

#[test]
fn a_dead_end_is_an_error_not_an_empty_mask() {
    let (factory, width) = grammars();
    // No token holds a byte of "é".
    let mut m = compile(&factory, &Constraint::Regex("é".into()), "test", &[EOS]).expect("compiles");
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    let e = m.fill_mask(&mut mask).expect_err("a dead end");
    assert!(e.contains("allows no next token"), "{e}");
}

#[test]
fn constraints_that_do_not_compile_name_their_parameter() {
    let (factory, _) = grammars();
    let bad = [
        Constraint::Regex("(".into()),
        Constraint::JsonSchema(serde_json::json!({"type": "no such type"})),
        Constraint::JsonSchema(serde_json::json!([1, 2])),
        Constraint::Choice(vec![]),
        Constraint::Lark("start: undefined_rule".into()),
    ];
    for c in bad {
        match compile(&factory, &c, "response_format", &[EOS]) {
            Err(Error::Request { param, message }) => {
                assert_eq!(param, "response_format", "{c:?}");
                assert!(!message.is_empty());
            }
            other => panic!("{c:?}: {other:?}"),
        }
    }
}

/// A committed token the mask did not allow is refused.
#[test]
fn a_token_outside_the_mask_does_not_commit() {
    let (factory, _) = grammars();
    let mut m = compile(&factory, &Constraint::Choice(vec!["no".into()]), "test", &[EOS]).expect("compiles");
    let y = words().iter().position(|w| w == b"y").expect("y") as u32;
    assert!(m.commit(y).is_err());
}
