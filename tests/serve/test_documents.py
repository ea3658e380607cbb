"""Finding a request's documents and question, and writing compressed text back: pure Python, no model."""

from __future__ import annotations

import copy

import pytest

from draft_rag.serve.documents import (
    FieldDocument,
    TaggedDocument,
    field_documents_block,
    find_documents,
    has_gateway_fields,
    rewrite,
)


def chat(*messages: tuple[str, object], **fields: object) -> dict:
    return {"model": "m", "messages": [{"role": role, "content": content} for role, content in messages], **fields}


def test_a_tagged_document_in_string_content_and_the_question_around_it():
    body = chat(("user", "Context:\n<document>The fox is red.</document>\n\nQuestion: What colour is the fox?"))
    found = find_documents(body)
    [doc] = found.documents
    assert doc == TaggedDocument("The fox is red.", 0, None, 19, 34)
    assert body["messages"][0]["content"][doc.start:doc.end] == "The fox is red."
    assert found.question == "Context:\n\nQuestion: What colour is the fox?"
    assert found.question_message == 0


@pytest.mark.parametrize("opening", [
    '<document id="3">', "<document id='3' source=\"a b.txt\">", "<document\n  index=1>", '<document title="x" >',
])
def test_opening_tags_may_carry_attributes(opening):
    [doc] = find_documents(chat(("user", f"{opening}kept text</document> Why?"))).documents
    assert doc.text == "kept text"


@pytest.mark.parametrize("text", [
    "<documents>not a document block</documents> Why?",
    "<documentation>not one either</documentation> Why?",
    "<document>opened but never closed. Why?",
    "<Document>another case</Document> Why?",
    "&lt;document&gt;escaped&lt;/document&gt; Why?",
])
def test_text_that_is_not_a_document_block_is_left_alone(text):
    body = chat(("user", text))
    found = find_documents(body)
    assert found.documents == []
    assert rewrite(body, found, []) == body


def test_documents_in_every_message_and_part_in_prompt_order():
    body = chat(
        ("system", "Use these: <document>S1</document> and <document>S2</document>."),
        ("user", "First turn <document>U0</document>?"),
        ("assistant", "An answer."),
        ("user", [
            {"type": "text", "text": "<document>P0</document>"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "<document>P2a</document><document>P2b</document>\nWhich one?"},
        ]),
    )
    found = find_documents(body)
    assert found.texts == ["S1", "S2", "U0", "P0", "P2a", "P2b"]
    assert [(d.message, d.part) for d in found.documents] == [(0, None), (0, None), (1, None), (3, 0), (3, 2), (3, 2)]
    assert found.question == "Which one?"
    assert found.question_message == 3


def test_the_question_is_the_last_user_message_without_its_documents():
    body = chat(("user", "An old question?"), ("assistant", "An old answer."),
                ("user", "<document>A</document>\n\n\n   \n<document>B</document>\n\n  The new question?  "),
                ("assistant", None))
    found = find_documents(body)
    assert found.question == "The new question?"
    assert found.question_message == 2


def test_list_content_joins_its_text_parts_for_the_question():
    body = chat(("user", [{"type": "text", "text": "<document>D</document>Part one."},
                          {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                          {"type": "text", "text": "Part two?"}]))
    assert find_documents(body).question == "Part one.\nPart two?"


def test_without_a_user_message_there_is_no_question():
    found = find_documents(chat(("system", "<document>D</document> Answer.")))
    assert found.question == "" and found.question_message is None
    assert found.texts == ["D"]
    with pytest.raises(ValueError, match="user message"):
        rewrite(chat(("system", "x")), find_documents(chat(("system", "x")), [FieldDocument("F")]), ["F"])


def test_tagged_documents_are_compressed_in_place_and_nothing_else_changes():
    body = chat(
        ("system", "Rules <document kind='a'>alpha alpha alpha</document> end."),
        ("user", [{"type": "text", "text": "é <document>βeta βeta</document>😀<document>gamma</document> ?",
                   "cache_control": {"type": "ephemeral"}},
                  {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
        temperature=0.25, stop=["\n"], metadata={"k": [1, 2.5, None]},
    )
    body["messages"][1]["name"] = "someone"
    original = copy.deepcopy(body)
    found = find_documents(body)
    new = rewrite(body, found, ["A", "b … b", ""])

    assert body == original, "the request must not be modified"
    assert new["messages"][0]["content"] == "Rules <document kind='a'>A</document> end."
    parts = new["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "é <document>b … b</document>😀<document></document> ?",
                        "cache_control": {"type": "ephemeral"}}
    assert parts[1] is body["messages"][1]["content"][1]
    assert new["messages"][1]["name"] == "someone"
    assert {k: v for k, v in new.items() if k != "messages"} == {k: v for k, v in body.items() if k != "messages"}
    # Writing the original texts back gives the request as it came.
    assert rewrite(body, found, found.texts) == body


def test_messages_without_documents_are_the_same_objects():
    body = chat(("system", "No documents here."), ("user", "<document>D</document> Q?"))
    new = rewrite(body, find_documents(body), ["d"])
    assert new["messages"][0] is body["messages"][0]
    assert new["messages"][1] is not body["messages"][1]


def test_field_documents_go_before_the_question_in_string_content():
    body = chat(("user", "What is the magic number?"), documents=["x"], draft_rag={"budget": 3}, top_p=0.5)
    docs = [FieldDocument("First text."), FieldDocument("Second text.", 'A "quoted" <title> & more')]
    found = find_documents(body, docs)
    assert found.documents == docs
    new = rewrite(body, found, ["First.", "Second."])
    assert new["messages"][0]["content"] == (
        '<document index="1">\nFirst.\n</document>\n\n'
        '<document index="2" title="A &quot;quoted&quot; &lt;title&gt; &amp; more">\nSecond.\n</document>\n\n'
        "What is the magic number?"
    )
    assert new == {"model": "m", "messages": new["messages"], "top_p": 0.5}, "documents and draft_rag are removed"


def test_field_documents_go_first_in_list_content():
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = chat(("user", [image, {"type": "text", "text": "Describe it."}]))
    new = rewrite(body, find_documents(body, [FieldDocument("Doc")]), ["Doc"])
    assert new["messages"][0]["content"] == [
        {"type": "text", "text": '<document index="1">\nDoc\n</document>\n\n'}, image,
        {"type": "text", "text": "Describe it."},
    ]


def test_field_documents_sit_between_earlier_and_last_user_message_tagged_documents():
    body = chat(("system", "<document>S</document>"), ("user", "<document>U</document> Q?"))
    found = find_documents(body, [FieldDocument("F")])
    assert found.texts == ["S", "F", "U"]
    new = rewrite(body, found, ["s", "f", "u"])
    assert new["messages"][0]["content"] == "<document>s</document>"
    assert new["messages"][1]["content"] == '<document index="1">\nf\n</document>\n\n<document>u</document> Q?'


def test_field_documents_written_into_a_user_message_without_content():
    body = {"messages": [{"role": "user", "content": None}]}
    new = rewrite(body, find_documents(body, [FieldDocument("F")]), ["F"])
    assert new["messages"][0]["content"] == field_documents_block([(FieldDocument("F"), "F")])


def test_rewrite_needs_one_text_per_document():
    body = chat(("user", "<document>D</document> Q?"))
    with pytest.raises(ValueError, match="1 documents, 2 texts"):
        rewrite(body, find_documents(body), ["a", "b"])


def test_gateway_fields_are_recognised():
    assert not has_gateway_fields(chat(("user", "Q")))
    assert has_gateway_fields(chat(("user", "Q"), documents=[]))
    assert has_gateway_fields(chat(("user", "Q"), draft_rag={"compress": False}))
    body = chat(("user", "Q"), documents=[], draft_rag={})
    assert rewrite(body, find_documents(body), []) == chat(("user", "Q"))
