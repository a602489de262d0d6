//! Strict tool calls in `auto` mode over a byte vocabulary (every printable ASCII byte, `\n`,
//! a `<|python_tag|>` special token): free text is never constrained, a call is constrained
//! from its opening `{` on, and arguments that break a keyword the grammar cannot enforce are
//! caught after generation.

use serde_json::json;

use super::vocabulary::env_of_words;
use super::*;

const EOS: u32 = 0;
const TAG: u32 = 1;

fn words() -> Vec<Vec<u8>> {
    let mut w = vec![b"\xff<eos>".to_vec(), b"\xff<|python_tag|>".to_vec(), b"\n".to_vec()];
    w.extend((0x20u8..0x7f).map(|b| vec![b]));
    w
}

fn token(b: u8) -> u32 {
    match b {
        b'\n' => 2,
        b => u32::from(b - 0x20) + 3,
    }
}

fn calls(parallel: bool) -> ToolCalls {
    let city = json!({"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
        "required": ["city"], "additionalProperties": false});
    // `uniqueItems` is beyond the grammar: checked after generation.
    let tags = json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
        "uniqueItems": true}}, "required": ["tags"]});
    ToolCalls {
        functions: vec![("get_weather".into(), Some(city)), ("label".into(), Some(tags)), ("loose".into(), None)],
        parallel,
    }
}

/// How feeding an answer (bytes, and `TAG` where the text has `\u{1}`) ended.
#[derive(Debug, PartialEq)]
enum Fed {
    Valid,
    RefusedAt(usize),
    Checked(String),
}

fn feed(calls: &ToolCalls, answer: &str) -> Fed {
    let w = words();
    let width = w.len();
    let f = factory(&env_of_words(w, width, &[EOS], false)).expect("factory");
    let mut m = compile(&f, &Constraint::ToolCalls(calls.clone()), "tools", &[EOS]).expect("compiles");
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    let allows = |mask: &[u32], t: u32| mask[t as usize / 32] >> (t % 32) & 1 == 1;
    for (i, b) in answer.bytes().enumerate() {
        let t = if b == 1 { TAG } else { token(b) };
        if m.fill_mask(&mut mask).is_err() || !allows(&mask, t) {
            return Fed::RefusedAt(i);
        }
        m.commit(t).expect("an allowed token commits");
    }
    if m.fill_mask(&mut mask).is_err() || !allows(&mask, EOS) {
        return Fed::RefusedAt(answer.len());
    }
    match m.commit(EOS) {
        Ok(()) => Fed::Valid,
        Err(e) => Fed::Checked(e),
    }
}

#[test]
fn free_text_stays_free() {
    let c = calls(true);
    for text in ["", "  \n", "Paris is sunny.", "The call would be {\"name\": \"nope\"} but no.", " <b>{x}</b>", "x{\n"]
    {
        assert_eq!(feed(&c, text), Fed::Valid, "{text:?}");
    }
    // Every token is allowed at the start but for none: `{` opens a call and is allowed too.
    let w = words();
    let width = w.len();
    let f = factory(&env_of_words(w, width, &[EOS], false)).expect("factory");
    let mut m = compile(&f, &Constraint::ToolCalls(c), "tools", &[EOS]).expect("compiles");
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    m.fill_mask(&mut mask).expect("a mask");
    let refused: Vec<u32> = (0..width as u32).filter(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 0).collect();
    assert_eq!(refused, Vec::<u32>::new());
}

#[test]
fn a_call_is_constrained_from_its_opening_brace() {
    let c = calls(true);
    let paris = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    let lyon = r#"{"name":"get_weather","parameters":{"city":"Lyon"}}"#;
    for ok in [
        paris.to_string(),
        format!("\n {paris}\n"),
        format!("\u{1}{paris}"),
        format!(" \n\u{1} {paris}"),
        format!("{paris}; {lyon}"),
        format!("{paris}\n{lyon} Both sent."),
        r#"{"name": "loose", "parameters": {"anything": [1, 2]}}"#.to_string(),
    ] {
        assert_eq!(feed(&c, &ok), Fed::Valid, "{ok}");
    }
    // Where the grammar refuses: the first byte that leaves the function's schema.
    for (bad, at) in [
        (r#"{"name": "get_weather", "parameters": {"city": "Rome"}}"#, 48),
        (r#"{"name": "nope", "parameters": {}}"#, 10),
        (r#"{"parameters": {}, "name": "get_weather"}"#, 2),
        (r#"{"name": "get_weather", "parameters": {"city": "Paris", "x": 1}}"#, 54),
        (r#"{"name": "get_weather", "parameters": {}}"#, 39),
        ("{Paris is sunny", 1),
    ] {
        assert_eq!(feed(&c, bad), Fed::RefusedAt(at), "{bad}");
    }
    // After a call: another valid call, text, or nothing; not a call the schema refuses.
    assert_eq!(feed(&c, &format!("{paris} {{\"name\": \"nope\"")), Fed::RefusedAt(paris.len() + 11));
    // Without parallel calls, a second call cannot open.
    assert_eq!(feed(&calls(false), &format!("{paris} Done.")), Fed::Valid);
    assert_eq!(feed(&calls(false), &format!("{paris} {lyon}")), Fed::RefusedAt(paris.len() + 1));
}

#[test]
fn arguments_that_break_a_relaxed_keyword_are_caught_after() {
    let c = calls(true);
    let ok = r#"{"name": "label", "parameters": {"tags": ["a", "b"]}}"#;
    assert_eq!(feed(&c, ok), Fed::Valid);
    let twice = r#"{"name": "label", "parameters": {"tags": ["a", "a"]}}"#;
    for answer in [twice.to_string(), format!("{ok}; {twice}")] {
        match feed(&c, &answer) {
            Fed::Checked(e) => {
                assert!(e.starts_with(SCHEMA_VIOLATION) && e.contains("`uniqueItems`"), "{e}");
                assert!(e.contains("`label`"), "{e}");
            }
            other => panic!("{answer}: {other:?}"),
        }
    }
}
