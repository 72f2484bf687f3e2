"""The text form of kiln IR (parser side): ``parse_graph(text, weights=None, source="<ir>") -> Graph``.

Reads what ``kiln.ir.printer`` writes (grammar in its docstring). Every error is a ``KilnParseError``
with the 1-based line and column of the offending token. Result types are taken from the text as
written (the verifier re-infers and compares them); weights, if given, are attached by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from kiln.errors import KilnError, KilnParseError
from kiln.ir.graph import Graph, Value
from kiln.ir.ops import get_op
from kiln.ir.types import (
    DTYPE_BY_NAME,
    SCALAR_KINDS,
    NoneType,
    QuantParams,
    ScalarType,
    SparsityInfo,
    TensorType,
    Type,
    sym,
)

_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#\#[^\n]*)
  | (?P<value>%[A-Za-z0-9_]+)
  | (?P<global>@[A-Za-z0-9_.]+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<arrow>->)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\]{},:=\#*+/\-^<>])
""", re.VERBOSE)


@dataclass
class Token:
    kind: str
    text: str
    pos: int
    line: int
    col: int


class _Lexer:
    def __init__(self, text: str, source: str):
        self.text, self.source = text, source
        self.tokens: list[Token] = []
        pos, line, line_start = 0, 1, 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                what = "unterminated string" if text[pos] == '"' else f"unexpected character {text[pos]!r}"
                raise KilnParseError(what, line, pos - line_start + 1, source)
            kind = m.lastgroup
            if kind != "ws":
                self.tokens.append(Token(kind, m.group(), pos, line, pos - line_start + 1))
            newlines = m.group().count("\n")
            if newlines:
                line += newlines
                line_start = m.start() + m.group().rindex("\n") + 1
            pos = m.end()
        self.tokens.append(Token("eof", "", len(text), line, pos - line_start + 1))
        self.i = 0

    def peek(self, k: int = 0) -> Token:
        return self.tokens[min(self.i + k, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.peek()
        self.i += 1
        return tok

    def error(self, message: str, tok: Token | None = None) -> KilnParseError:
        tok = tok or self.peek()
        return KilnParseError(message, tok.line, tok.col, self.source)

    def expect(self, text: str) -> Token:
        tok = self.next()
        if tok.text != text:
            shown = tok.text or "end of input"
            raise self.error(f"expected '{text}', found '{shown}'", tok)
        return tok

    def accept(self, text: str) -> bool:
        if self.peek().text == text:
            self.i += 1
            return True
        return False


class _Parser:
    def __init__(self, text: str, source: str, weights: dict[str, torch.Tensor] | None):
        self.lx = _Lexer(text, source)
        self.weights = weights

    def parse(self) -> Graph:
        g = self.graph()
        if self.lx.peek().kind != "eof":
            raise self.lx.error(f"unexpected '{self.lx.peek().text}' after the graph")
        return g

    # -- graphs --------------------------------------------------------------------------------------
    def graph(self) -> Graph:
        lx = self.lx
        lx.expect("graph")
        name_tok = lx.next()
        if name_tok.kind != "global":
            raise lx.error("expected a graph name like @main", name_tok)
        g = Graph(name_tok.text[1:])
        scope: dict[str, Value] = {}
        lx.expect("(")
        while not lx.accept(")"):
            tok = lx.next()
            if tok.kind != "value":
                raise lx.error("expected an input like %x: f32[2, 3]", tok)
            lx.expect(":")
            self._define(scope, tok, g.add_input(self.type(), tok.text[1:]))
            if not lx.accept(","):
                lx.expect(")")
                break
        lx.expect("->")
        declared = self.type_tuple()
        lx.expect("{")
        while lx.peek().text != "return":
            if lx.peek().kind == "eof":
                raise lx.error("unterminated graph: expected 'return'")
            self.statement(g, scope)
        ret_tok = lx.expect("return")
        outs: list[Value] = []
        if lx.peek().text != "}":
            outs.append(self.use(scope))
            while lx.accept(","):
                outs.append(self.use(scope))
        lx.expect("}")
        if [v.type for v in outs] != declared:
            raise lx.error("returned values do not match the declared result types", ret_tok)
        g.set_outputs(outs)
        return g

    def statement(self, g: Graph, scope: dict[str, Value]) -> None:
        lx = self.lx
        lhs: list[Token] = []
        if lx.peek().kind == "value":
            lhs.append(lx.next())
            while lx.accept(","):
                tok = lx.next()
                if tok.kind != "value":
                    raise lx.error("expected a result name like %r", tok)
                lhs.append(tok)
            lx.expect("=")
        op_tok = lx.next()
        if op_tok.kind != "ident":
            raise lx.error(f"expected an op name, found '{op_tok.text}'", op_tok)
        try:
            op = get_op(op_tok.text)
        except KilnError as e:
            raise lx.error(str(e), op_tok) from None
        args, kwargs = self.call_args(scope)
        attrs = self.attrs() if lx.peek().text == "{" else {}
        lx.expect(":")
        types = self.type_tuple() if lx.peek().text == "(" else [self.type()]
        subgraph = self.graph() if lx.peek().text == "graph" else None
        if len(types) != len(lhs):
            raise lx.error(f"{len(lhs)} results named but {len(types)} types given", op_tok)
        for tok in lhs:
            if tok.text[1:] in scope:
                raise lx.error(f"value {tok.text} is defined twice", tok)
        if op.name == "kiln.weight" and self.weights is not None:
            wname = attrs.get("name")
            if wname not in self.weights:
                raise lx.error(f"weight {wname!r} is not in the weights file", op_tok)
            g.weights[wname] = self.weights[wname]
        node = g.create_node(op, args, kwargs, types, names=[t.text[1:] for t in lhs], attrs=attrs,
                             subgraph=subgraph)
        for tok, r in zip(lhs, node.results):
            if r.name != tok.text[1:]:
                raise lx.error(f"value name {tok.text} clashes with another name", tok)
            scope[r.name] = r

    def _define(self, scope: dict[str, Value], tok: Token, v: Value) -> None:
        if tok.text[1:] in scope or v.name != tok.text[1:]:
            raise self.lx.error(f"value {tok.text} is defined twice", tok)
        scope[v.name] = v

    def use(self, scope: dict[str, Value]) -> Value:
        tok = self.lx.next()
        if tok.kind != "value":
            raise self.lx.error(f"expected a value like %x, found '{tok.text}'", tok)
        try:
            return scope[tok.text[1:]]
        except KeyError:
            raise self.lx.error(f"use of undefined value {tok.text}", tok) from None

    def call_args(self, scope) -> tuple[list, dict]:
        lx = self.lx
        lx.expect("(")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        while not lx.accept(")"):
            if lx.peek().kind == "ident" and lx.peek(1).text == "=":
                key = lx.next().text
                lx.next()
                kwargs[key] = self.literal(scope)
            else:
                if kwargs:
                    raise lx.error("positional argument after a keyword argument")
                args.append(self.literal(scope))
            if not lx.accept(","):
                lx.expect(")")
                break
        return args, kwargs

    # -- literals ------------------------------------------------------------------------------------
    def literal(self, scope: dict[str, Value] | None) -> Any:
        lx = self.lx
        tok = lx.peek()
        if tok.kind == "value":
            if scope is None:
                raise lx.error("values are not allowed here", tok)
            return self.use(scope)
        if tok.kind == "number":
            lx.next()
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "string":
            lx.next()
            return json.loads(tok.text)
        if tok.text == "[":
            lx.next()
            items: list[Any] = []
            while not lx.accept("]"):
                items.append(self.literal(scope))
                if not lx.accept(","):
                    lx.expect("]")
                    break
            return items
        if tok.text == "{":
            return self.attrs()
        if tok.text == "-" and lx.peek(1).text == "inf":
            lx.next()
            lx.next()
            return float("-inf")
        if tok.kind == "ident":
            lx.next()
            simple = {"none": None, "true": True, "false": False, "inf": float("inf"), "nan": float("nan")}
            if tok.text in simple:
                return simple[tok.text]
            if tok.text in ("dtype", "device", "layout", "memory_format"):
                lx.expect("(")
                inner = lx.next()
                lx.expect(")")
                return self._special(tok, inner)
        raise lx.error(f"expected a value or literal, found '{tok.text or 'end of input'}'", tok)

    def _special(self, tok: Token, inner: Token) -> Any:
        try:
            if tok.text == "dtype":
                return DTYPE_BY_NAME[inner.text]
            if tok.text == "device":
                return torch.device(json.loads(inner.text))
            value = getattr(torch, inner.text)
            expected = torch.layout if tok.text == "layout" else torch.memory_format
            if isinstance(value, expected):
                return value
        except (KeyError, RuntimeError, ValueError, AttributeError):
            pass
        raise self.lx.error(f"bad {tok.text} literal '{inner.text}'", inner)

    def attrs(self) -> dict[str, Any]:
        lx = self.lx
        lx.expect("{")
        out: dict[str, Any] = {}
        while not lx.accept("}"):
            key = lx.next()
            if key.kind != "ident":
                raise lx.error("expected an attribute name", key)
            lx.expect("=")
            out[key.text] = self.literal(None)
            if not lx.accept(","):
                lx.expect("}")
                break
        return out

    # -- types ---------------------------------------------------------------------------------------
    def type_tuple(self) -> list[Type]:
        lx = self.lx
        lx.expect("(")
        types: list[Type] = []
        while not lx.accept(")"):
            types.append(self.type())
            if not lx.accept(","):
                lx.expect(")")
                break
        return types

    def type(self) -> Type:
        lx = self.lx
        tok = lx.next()
        if tok.text == "none":
            return NoneType()
        if tok.text in SCALAR_KINDS and lx.peek().text != "[":
            expr = None
            if lx.peek().text == "(":
                expr = self._expr_until(("(",), (")",))
            return ScalarType(tok.text, expr)
        if tok.text not in DTYPE_BY_NAME:
            raise lx.error(f"expected a type, found '{tok.text or 'end of input'}'", tok)
        lx.expect("[")
        dims: list[Any] = []
        if not lx.accept("]"):
            while True:
                dims.append(self._dim())
                closer = lx.next()
                if closer.text == "]":
                    break
                if closer.text != ",":
                    raise lx.error(f"expected ',' or ']' in a shape, found '{closer.text}'", closer)
        layout, quant, sparsity = "contiguous", None, None
        if lx.peek().text == "#":
            lx.next()
            ann_tok = lx.peek()
            ann = self.attrs()
            try:
                layout = ann.pop("layout", "contiguous")
                if "quant" in ann:
                    q = ann.pop("quant")
                    quant = QuantParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in q.items()})
                if "sparsity" in ann:
                    s = ann.pop("sparsity")
                    sparsity = SparsityInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                if ann:
                    raise ValueError(f"unknown type annotation(s) {sorted(ann)}")
                return TensorType(tuple(dims), DTYPE_BY_NAME[tok.text], layout, quant, sparsity)
            except (TypeError, ValueError) as e:
                raise lx.error(f"bad type annotation: {e}", ann_tok) from None
        return TensorType(tuple(dims), DTYPE_BY_NAME[tok.text])

    def _dim(self):
        lx = self.lx
        tok = lx.peek()
        if tok.kind == "number" and lx.peek(1).text in (",", "]"):
            lx.next()
            if not tok.text.lstrip("-").isdigit():
                raise lx.error(f"a dim must be an integer, found '{tok.text}'", tok)
            return int(tok.text)
        return self._expr_until((), (",", "]"))

    def _expr_until(self, openers: tuple[str, ...], closers: tuple[str, ...]) -> sympy.Expr:
        """Parse a sympy expression from the raw text up to a depth-0 closer."""
        lx = self.lx
        if openers:
            lx.expect(openers[0])
        start_tok = lx.peek()
        depth = 0
        while True:
            tok = lx.peek()
            if tok.kind == "eof":
                raise lx.error("unterminated expression", start_tok)
            if depth == 0 and tok.text in closers:
                break
            depth += tok.text in ("(", "[")
            depth -= tok.text in (")", "]")
            lx.next()
        text = lx.text[start_tok.pos:lx.peek().pos].strip()
        if openers:
            lx.expect(")")
        return self._sympify(text, start_tok)

    def _sympify(self, text: str, tok: Token) -> sympy.Expr:
        if not text:
            raise self.lx.error("empty expression", tok)
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        funcs = {"Max": sympy.Max, "Min": sympy.Min, "floor": sympy.floor, "ceiling": sympy.ceiling,
                 "Mod": sympy.Mod, "True": sympy.true, "False": sympy.false}
        local = {n: funcs.get(n) or sym(n) for n in names}
        try:
            return sympy.parse_expr(text, local_dict=local, evaluate=True)
        except Exception as e:  # sympy raises SyntaxError, TokenError, TypeError...
            raise self.lx.error(f"bad symbolic expression '{text}': {e}", tok) from None


def parse_graph(text: str, weights: dict[str, torch.Tensor] | None = None, source: str = "<ir>") -> Graph:
    """Parse kiln IR text. ``weights`` (name -> tensor) are attached to ``kiln.weight`` nodes by name."""
    return _Parser(text, source, weights).parse()
