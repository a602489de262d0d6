//! Tokenizer and chat-template behaviour against the real Llama 3.1 tokenizer and the real
//! templates of Tülu 3, Llama 3.1 Instruct and SmolLM2.
//!
//! Expected strings are written by hand from each template's text. Expected token ids come from
//! Meta's own reference tokenizer (tiktoken with Llama 3's `tokenizer.model` and pattern), an
//! implementation independent of the `tokenizers` crate tulu uses.
//!
//! The Llama 3.1 tokenizer.json is not in the repo (9 MB): `scripts/fetch-llama3-tokenizer`
//! fetches it, and tests read `$TULU_LLAMA3_TOKENIZER` or else
//! `${TULU_CACHE:-$HOME/.cache/tulu}/llama3-tokenizer/tokenizer.json`.

use std::path::{Path, PathBuf};

use tulu::unstable::tokenizer::{ChatMessage, ChatTemplate, SpecialTokens, Tokenizer, ToolCall};
use tulu::Error;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read_fixture(name: &str) -> String {
    let path = fixture(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn llama3_tokenizer_json() -> PathBuf {
    let path = match std::env::var_os("TULU_LLAMA3_TOKENIZER") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("TULU_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tulu"));
            cache.join("llama3-tokenizer/tokenizer.json")
        }
    };
    assert!(
        path.is_file(),
        "the Llama 3.1 tokenizer is missing at {}: run scripts/fetch-llama3-tokenizer \
         (or set TULU_LLAMA3_TOKENIZER to a Llama 3.1 tokenizer.json)",
        path.display()
    );
    path
}

/// A model directory holding `tokenizer_json` and a tokenizer_config.json built from `config`.
fn model_dir(tokenizer_json: &Path, config: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(tokenizer_json, dir.path().join("tokenizer.json")).expect("copy tokenizer.json");
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write tokenizer_config.json");
    dir
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// Tülu 3's tokenizer: Llama 3.1's plus `<pad>` at 128256, declared as Tülu 3's
/// tokenizer_config.json does.
fn tulu3_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<pad>",
        "added_tokens_decoder": {
            "128000": {"content": "<|begin_of_text|>", "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true},
            "128001": {"content": "<|end_of_text|>", "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true},
            "128256": {"content": "<pad>", "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true}
        },
        "chat_template": read_fixture("tulu3_chat_template.jinja"),
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let dir = model_dir(&llama3_tokenizer_json(), config);
    let tok = Tokenizer::from_dir(dir.path()).expect("load Tülu 3 tokenizer");
    (dir, tok)
}

fn llama31_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": read_fixture("llama31_chat_template.jinja"),
    });
    let dir = model_dir(&llama3_tokenizer_json(), config);
    let tok = Tokenizer::from_dir(dir.path()).expect("load Llama 3.1 tokenizer");
    (dir, tok)
}

/// SmolLM2's special tokens over a byte-level fixture tokenizer: `<|endoftext|>` 0,
/// `<|im_start|>` 1, `<|im_end|>` 2, then byte b at id 3 + b (no merges), so ids are
/// computable by hand.
fn smollm2_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": read_fixture("smollm2_chat_template.jinja"),
    });
    let dir = model_dir(&fixture("bytes_tokenizer.json"), config);
    let tok = Tokenizer::from_dir(dir.path()).expect("load SmolLM2-like tokenizer");
    (dir, tok)
}

#[test]
fn tulu3_multi_turn_renders_and_encodes() {
    let (_dir, tok) = tulu3_tokenizer();
    assert_eq!(tok.vocab_size(), 128257);
    assert_eq!(tok.token_to_id("<pad>"), Some(128256));
    assert_eq!(tok.eos_token_ids(), vec![128001]);
    assert!(tok.has_chat_template());

    let messages = [
        msg("system", "You are Tülu, a helpful assistant."),
        msg("user", "What is 2+2?"),
        msg("assistant", "2+2 = 4."),
        msg("user", "And 3+3?"),
    ];
    // Every turn is `<|role|>\n` + content + `\n`; a non-final assistant turn ends with
    // eos_token before its `\n`; the generation prompt opens an assistant turn. No BOS.
    let expected = "<|system|>\nYou are Tülu, a helpful assistant.\n\
                    <|user|>\nWhat is 2+2?\n\
                    <|assistant|>\n2+2 = 4.<|end_of_text|>\n\
                    <|user|>\nAnd 3+3?\n\
                    <|assistant|>\n";
    assert_eq!(tok.render_chat(&messages, true).expect("render"), expected);

    // `<|system|>` etc. are plain text to Llama 3 ("<", "|", "system", "|", ">\n"); only
    // `<|end_of_text|>` is a special token.
    let expected_ids: Vec<u32> = vec![
        27, 91, 9125, 91, 397, 2675, 527, 350, 2448, 10036, 11, 264, 11190, 18328, 627, 27, 91, 882, 91, 397, 3923,
        374, 220, 17, 10, 17, 5380, 27, 91, 78191, 91, 397, 17, 10, 17, 284, 220, 19, 13, 128001, 198, 27, 91, 882, 91,
        397, 3112, 220, 18, 10, 18, 5380, 27, 91, 78191, 91, 397,
    ];
    assert_eq!(tok.encode_chat(&messages, true).expect("encode"), expected_ids);

    // Without the generation prompt the final user turn just ends.
    let rendered = tok.render_chat(&messages[..2], false).expect("render");
    assert_eq!(rendered, "<|system|>\nYou are Tülu, a helpful assistant.\n<|user|>\nWhat is 2+2?\n");
}

#[test]
fn llama3_plain_prompt_gets_bos_from_the_post_processor() {
    let (_dir, tok) = tulu3_tokenizer();
    assert_eq!(tok.encode_prompt("Hello").expect("encode"), vec![128000, 9906]);
    assert_eq!(tok.encode_raw("Hello").expect("encode"), vec![9906]);
    // Special-token text maps to the special id even with no special tokens added.
    assert_eq!(tok.encode_raw("<|eot_id|>Hello").expect("encode"), vec![128009, 9906]);
    assert_eq!(tok.decode(&[128000, 9906, 128001], true).expect("decode"), "Hello");
    assert_eq!(tok.decode(&[128000, 9906, 128001], false).expect("decode"), "<|begin_of_text|>Hello<|end_of_text|>");
}

#[test]
fn llama31_template_writes_exactly_one_bos() {
    let (_dir, tok) = llama31_tokenizer();
    assert_eq!(tok.vocab_size(), 128256);
    assert_eq!(tok.eos_token_ids(), vec![128009]);
    let messages = [msg("system", "You are a helpful assistant."), msg("user", "Hi!")];
    // date_string is undefined, so the template's own default "26 Jul 2024" applies.
    let expected = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                    Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
                    You are a helpful assistant.<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(tok.render_chat(&messages, true).expect("render"), expected);
    let ids = tok.encode_chat(&messages, true).expect("encode");
    let expected_ids: Vec<u32> = vec![
        128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696, 25,
        220, 1627, 10263, 220, 2366, 19, 271, 2675, 527, 264, 11190, 18328, 13, 128009, 128006, 882, 128007, 271,
        13347, 0, 128009, 128006, 78191, 128007, 271,
    ];
    assert_eq!(ids, expected_ids);
    assert_eq!(ids.iter().filter(|&&id| id == 128000).count(), 1);
}

#[test]
fn llama31_template_without_system_message() {
    let (_dir, tok) = llama31_tokenizer();
    // No system message: the system header still appears, with an empty system text, and
    // message contents are trimmed.
    let expected = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                    Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>";
    assert_eq!(tok.render_chat(&[msg("user", "  Hi!\n")], false).expect("render"), expected);
}

#[test]
fn smollm2_chatml_adds_the_default_system_prompt() {
    let (_dir, tok) = smollm2_tokenizer();
    assert_eq!(tok.vocab_size(), 259);
    assert_eq!(tok.eos_token_ids(), vec![2]);

    let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                    Hugging Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tok.render_chat(&[msg("user", "Hello")], true).expect("render"), expected);

    let messages = [msg("system", "Be brief."), msg("user", "Hello"), msg("assistant", "Hi.")];
    let expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n\
                    <|im_start|>assistant\nHi.<|im_end|>\n";
    assert_eq!(tok.render_chat(&messages, false).expect("render"), expected);

    // Byte b is id 3 + b; the ChatML markers are the special ids 1 and 2.
    let ids = tok.encode_chat(&[msg("user", "Hi")], false).expect("encode");
    let mut expected_ids = vec![1];
    expected_ids.extend(
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            .bytes()
            .map(|b| 3 + u32::from(b)),
    );
    expected_ids.extend([2, 3 + u32::from(b'\n'), 1]);
    expected_ids.extend("user\nHi".bytes().map(|b| 3 + u32::from(b)));
    expected_ids.extend([2, 3 + u32::from(b'\n')]);
    assert_eq!(ids, expected_ids);
    // SmolLM2 adds no BOS to a plain prompt.
    assert_eq!(tok.encode_prompt("Hi").expect("encode"), vec![3 + 72, 3 + 105]);
}

#[test]
fn chat_template_list_and_jinja_file_forms() {
    let tokenizer_json = fixture("bytes_tokenizer.json");
    // transformers' named-template list: "default" is the chat template.
    let config = serde_json::json!({
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"}
        ]
    });
    let dir = model_dir(&tokenizer_json, config);
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&[msg("user", "x")], false).expect("render"), "x<|im_end|>");
    // A chat_template.jinja beside the config overrides it, as in transformers.
    std::fs::write(dir.path().join("chat_template.jinja"), "J:{{ messages | length }}\n").expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&[msg("user", "x")], false).expect("render"), "J:1");
}

#[test]
fn no_chat_template_is_a_clear_error() {
    let tok = Tokenizer::from_files(&fixture("bytes_tokenizer.json"), None).expect("load");
    assert!(!tok.has_chat_template());
    match tok.render_chat(&[msg("user", "x")], true) {
        Err(Error::ChatTemplate { message }) => {
            assert!(message.contains("no tokenizer_config.json"), "{message}")
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
    let dir = model_dir(&fixture("bytes_tokenizer.json"), serde_json::json!({"eos_token": "<|im_end|>"}));
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert!(!tok.has_chat_template());
    match tok.encode_chat(&[msg("user", "x")], true) {
        Err(Error::ChatTemplate { message }) => {
            assert!(message.contains("has no chat_template"), "{message}")
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
}

#[test]
fn raise_exception_surfaces_its_message() {
    let source = "{% if messages[0]['role'] != 'user' %}\n{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n{% endif %}ok";
    let template = ChatTemplate::new(source).expect("parses");
    match template.render(&[msg("assistant", "x")], false, &SpecialTokens::default()) {
        Err(Error::ChatTemplate { message }) => {
            assert!(
                message.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
                "{message}"
            );
            assert!(message.contains("line 2"), "{message}");
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
    assert_eq!(template.render(&[msg("user", "x")], false, &SpecialTokens::default()).expect("render"), "ok");
}

#[test]
fn unparsable_template_names_the_line() {
    let source = "{% for message in messages %}\n{{ message.content }}\n{% if %}\n{% endfor %}";
    match ChatTemplate::new(source) {
        Err(Error::ChatTemplate { message }) => assert!(message.contains("line 3"), "{message}"),
        other => panic!("expected a chat template error, got {other:?}"),
    }
    // Through a tokenizer: the load succeeds (plain prompts still work), chat fails.
    let dir = model_dir(&fixture("bytes_tokenizer.json"), serde_json::json!({"chat_template": source}));
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert!(tok.has_chat_template());
    assert!(tok.encode_prompt("x").is_ok());
    match tok.render_chat(&[msg("user", "x")], true) {
        Err(Error::ChatTemplate { message }) => assert!(message.contains("line 3"), "{message}"),
        other => panic!("expected a chat template error, got {other:?}"),
    }
}

#[test]
fn missing_or_corrupt_files_name_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("tokenizer.json");
    match Tokenizer::from_files(&missing, None) {
        Err(Error::Tokenizer { file, .. }) => assert_eq!(file, missing),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
    match Tokenizer::from_dir(dir.path()) {
        Err(Error::Tokenizer { file, .. }) => assert_eq!(file, missing),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
    std::fs::write(&missing, "{\"version\": \"1.0\", \"model\": ").expect("write");
    match Tokenizer::from_files(&missing, None) {
        Err(Error::Tokenizer { file, message }) => {
            assert_eq!(file, missing);
            assert!(message.contains("not a valid tokenizer.json"), "{message}");
        }
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{not json").expect("write");
    match Tokenizer::from_files(&fixture("bytes_tokenizer.json"), Some(&config)) {
        Err(Error::Tokenizer { file, .. }) => assert_eq!(file, config),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
    // An added token whose id disagrees with tokenizer.json would shift every prompt.
    std::fs::write(&config, r#"{"added_tokens_decoder": {"7": {"content": "<|im_end|>", "special": true}}}"#)
        .expect("write");
    match Tokenizer::from_files(&fixture("bytes_tokenizer.json"), Some(&config)) {
        Err(Error::Tokenizer { file, message }) => {
            assert_eq!(file, config);
            assert!(message.contains("added_tokens_decoder.7"), "{message}");
        }
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

/// Pushes `ids` one by one; returns the pieces (push results, then finish).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut decoder = tok.stream_decoder();
    let mut pieces: Vec<String> = ids.iter().filter_map(|&id| decoder.push(id).expect("push")).collect();
    pieces.push(decoder.finish().expect("finish"));
    pieces
}

#[test]
fn streaming_never_breaks_a_character() {
    let (_dir, tok) = tulu3_tokenizer();
    let text = "Streaming 流式解码 works: 😀👍🏽 and ünïcödé — 日本語のテキスト 🇯🇵!";
    let ids = tok.encode_raw(text).expect("encode");
    // 👍 is split over three byte tokens (f0 9f | 91 | 8d): the case that must be held back.
    assert!(ids.windows(3).any(|w| w == [9468, 239, 235]), "{ids:?}");
    let pieces = stream(&tok, &ids);
    for piece in &pieces {
        assert!(!piece.contains('\u{FFFD}'), "replacement char in piece {piece:?} of {pieces:?}");
    }
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces.concat(), tok.decode(&ids, true).expect("decode"));

    // A generation as the engine sees it: BOS, text, EOS. Special tokens are skipped.
    let mut ids = vec![128000];
    ids.extend(tok.encode_raw("Hi 👋 there").expect("encode"));
    ids.push(128001);
    let pieces = stream(&tok, &ids);
    assert_eq!(pieces.concat(), "Hi 👋 there");
    assert_eq!(pieces.concat(), tok.decode(&ids, true).expect("decode"));
}

#[test]
fn streaming_pseudo_random_text_matches_full_decode() {
    let (_dir, tok) = tulu3_tokenizer();
    // A fixed LCG picks from a mix of scripts so runs are reproducible.
    let alphabet: Vec<char> = "abc xyz,.!\n\té漢字かな한국어🙂🚀👨‍👩‍👧Ωж🇫🇷€".chars().collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20 {
        let text: String = (0..60)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                alphabet[(state >> 33) as usize % alphabet.len()]
            })
            .collect();
        let ids = tok.encode_raw(&text).expect("encode");
        let pieces = stream(&tok, &ids);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
    }

    // Bytes that never complete a character: held back, then flushed by finish() exactly as a
    // full decode shows them.
    let ids = vec![9906, 9468]; // "Hello", then a lone f0 9f
    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.push(ids[0]).expect("push").as_deref(), Some("Hello"));
    assert_eq!(decoder.push(ids[1]).expect("push"), None);
    let full = tok.decode(&ids, true).expect("decode");
    assert_eq!(format!("Hello{}", decoder.finish().expect("finish")), full);
}

#[test]
fn llama31_template_renders_tool_calls_and_their_results() {
    let (_dir, tok) = llama31_tokenizer();
    let call = ToolCall::function("call_0", "get_weather", serde_json::json!({"city": "Paris"}));
    let messages = [
        msg("user", "Weather in Paris?"),
        ChatMessage::assistant("").with_tool_calls(vec![call]),
        ChatMessage::tool("call_0", "21 degrees"),
    ];
    let text = tok.render_chat(&messages, true).expect("render");
    let call_turn = "<|start_header_id|>assistant<|end_header_id|>\n\n\
                     {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>";
    assert!(text.contains(call_turn), "{text}");
    assert!(text.contains("<|start_header_id|>ipython<|end_header_id|>\n\n\"21 degrees\"<|eot_id|>"), "{text}");
    // A message without tool calls is not rendered as one (the template tests for the key).
    assert!(!tok.render_chat(&[msg("user", "Hi")], true).unwrap().contains("\"name\""));
}
