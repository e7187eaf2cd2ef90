"""The token-level attribution view: one conversation as flowing text, coloured per token.

:func:`token_view_data` computes, for one model, one text or conversation and a probe direction,
every per-token quantity the view can colour by:

- input surprise ``s_t`` and output entropy ``H_t`` (nats; docs/concepts.md);
- the probe's decoded surprise at each layer that has a probe (``probes``);
- the entropy change when the direction is added at ``+strength`` / ``-strength`` (units of the
  projection's std, at the direction's hook, every position): ``H_t(steered) - H_t(clean)``;
- the attribution of ``H_t`` to the component along the direction at each layer
  (:func:`surprise_probe.interventions.attribution.direction_attribution`: the first-order
  estimate of ``H_t(clean) - H_t(direction projected out at that layer)``);
- the top-5 next tokens and their probabilities.

:func:`token_view_html` renders that as an HTML fragment (inline CSS and JS, no plotly): a menu
chooses the quantity and a second menu the layer; changing either recolours the text in place.
Hovering a token shows every value (attribution at every layer as a small bar chart) and the
top-5 next tokens. The scored span is underlined; every 10th position is numbered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import torch

from surprise_probe.core.forward.directions import SteeringDirection, from_probe
from surprise_probe.core.forward.edits import Steer, apply_all
from surprise_probe.core.forward.hooks import resid_post_hooks, resolve_hooks
from surprise_probe.core.forward.metrics import output_entropy, surprise_and_entropy
from surprise_probe.core.forward.passes import forward
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.encoding import encode, pad_batch, pad_id
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, number_text
from surprise_probe.core.utils.plots import write_report
from surprise_probe.interventions.attribution import direction_attribution

__all__ = ["TokenViewData", "token_view_data", "token_view_html"]


def _plain(values) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(values, float)]


@dataclass(repr=False)
class TokenViewData(NotebookView):
    """Per-token values of one read, for :func:`token_view_html`. Lists are per shown token;
    ``None`` marks a value that does not exist (input surprise at position 0) or was not computed."""

    model_id: str
    title: str
    tokens: list[str]
    token_ids: list[int]
    positions: list[int]  # position in the full sequence (the view may be cut at max_tokens)
    scored: list[bool]
    input_surprise: list[float | None]
    output_entropy: list[float | None]
    hooks: list[str]  # the layers the layer menu offers
    decoded_surprise: dict[str, list[float | None]]  # hook -> probe prediction (hooks with a probe)
    attribution: dict[str, list[float | None]]  # hook -> first-order attribution of H_t (nats)
    steer_hook: str
    strength: float
    steer_plus: list[float | None]  # H_t(+strength) - H_t(clean), nats
    steer_minus: list[float | None]  # H_t(-strength) - H_t(clean), nats
    top_next: list[list[tuple[str, float]]]  # 5 most likely next tokens and probabilities
    n_tokens_total: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        scored = [i for i, flag in enumerate(self.scored) if flag]

        def mean(values):
            kept = [values[i] for i in scored if values[i] is not None]
            return number_text(sum(kept) / len(kept) if kept else None)

        shown = f"{len(self.tokens)} of {self.n_tokens_total} tokens ({len(scored)} scored)"
        rows = [("model", self.model_id), ("shown", shown),
                ("mean input surprise (scored)", f"{mean(self.input_surprise)} nats"),
                ("mean output entropy (scored)", f"{mean(self.output_entropy)} nats"),
                ("steering", f"+/-{self.strength:g} std at {self.steer_hook}"),
                ("probe layers", f"{len(self.decoded_surprise)} of {len(self.hooks)}"),
                ("view", "token_view_html(data), or .save(folder) -> token_view.html")]
        return f"{self.model_id}: {shown}, steered at {self.steer_hook}", rows

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``token_view.json`` and a standalone ``token_view.html`` into ``folder``."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return {
            "html": write_report([("", token_view_html(self))], folder / "token_view.html",
                                 self.title or f"{self.model_id}: token view"),
            "json": write_json(folder / "token_view.json", {**self.to_dict(), "software_versions": software_versions()}),
        }


def _steering(model, direction) -> SteeringDirection:
    return from_probe(model, direction)


def _steer(hook: str, vector, strengths, std: float) -> Steer:
    return Steer(hooks=hook, direction=vector, strength=torch.as_tensor(strengths), scale=std)


@torch.no_grad()
def _clean_and_steered(model, batch, hooks, steering: SteeringDirection, strength: float):
    logits, acts = forward(model, batch, hooks)
    surprise, entropy = surprise_and_entropy(logits, batch.tokens)
    probs = torch.softmax(logits[0].float(), dim=-1)
    top = probs.topk(5, dim=-1)
    tokens = batch.tokens.expand(2, -1)
    mask = batch.attention_mask.expand(2, -1)
    steer = _steer(steering.hook, steering.direction, [strength, -strength], steering.std)
    with apply_all(model, [steer]):
        steered = output_entropy(model(tokens, attention_mask=mask, return_type="logits"))
    change = (steered.double() - entropy.double()).cpu().numpy()
    return surprise[0], entropy[0], acts, top, change


def token_view_data(
    model,
    item,
    direction,
    *,
    probes: Mapping[str, object] | None = None,
    hooks: Sequence[str] | None = None,
    strength: float = 4.0,
    max_tokens: int = 160,
    attribution: bool = True,
    chunk_size: int = 8,
    title: str = "",
) -> TokenViewData:
    """Every per-token quantity of the view for one read of ``item`` (module doc).

    ``direction``: the surprise probe direction (``probes.ProbeDirection`` or
    ``SteeringDirection``) used for steering and attribution. ``probes``: hook -> probe direction
    whose ``predict`` decodes surprise at that hook (e.g. ``{h: sweep.direction(h) for h in hooks}``).
    ``hooks``: the layers offered (default: every ``hook_resid_post``). The view starts at the
    first token and shows at most ``max_tokens`` tokens (a note says when it was cut).

    >>> from surprise_probe.testing import tiny_model
    >>> from surprise_probe.interventions import SteeringDirection
    >>> model = tiny_model()
    >>> d = SteeringDirection(torch.ones(64) / 8, "blocks.1.hook_resid_post", std=1.0)
    >>> data = token_view_data(model, "The quick brown fox.", d)
    >>> len(data.tokens) == len(data.attribution["blocks.0.hook_resid_post"]), data.input_surprise[0]
    (True, None)
    """
    if not np.isfinite(strength) or strength <= 0:
        raise ValueError(f"strength must be a positive finite number (units of the projection std), got {strength}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    steering = _steering(model, direction)
    hooks = resolve_hooks(model, hooks=list(hooks) if hooks is not None else resid_post_hooks(model))
    probes = dict(probes or {})
    probe_hooks = resolve_hooks(model, hooks=list(probes)) if probes else []
    for probe in probes.values():
        check = getattr(probe, "check_model", None)
        if check is not None:
            check(model)
    encoded = encode(model, item)
    n_total = len(encoded)
    shown = min(n_total, int(max_tokens))
    # causal: the tokens after the view change nothing in it, so they are not run
    encoded = dataclasses.replace(encoded, token_ids=encoded.token_ids[:shown], scored=encoded.scored[:shown])
    batch = pad_batch([encoded], pad_id(model))
    surprise, entropy, acts, top, change = _clean_and_steered(
        model, batch, list(dict.fromkeys(probe_hooks)), steering, float(strength))
    tokenizer = model.tokenizer
    tokens = [tokenizer.decode([int(t)]) for t in encoded.token_ids[:shown]]
    top_next = [
        [(tokenizer.decode([int(i)]), round(float(p), 4)) for i, p in zip(top.indices[t], top.values[t], strict=True)]
        for t in range(shown)
    ]
    decoded = {}
    for hook in hooks:
        if hook in probes:
            values = probes[hook].predict(acts[hook][0, :shown].double().cpu().numpy())
            decoded[hook] = _plain(values)
    attributed = {}
    if attribution:
        values = direction_attribution(model, encoded, steering, hooks=hooks, targets=range(shown),
                                       chunk_size=chunk_size)
        attributed = {hook: _plain(values[k, :shown]) for k, hook in enumerate(hooks)}
    notes = []
    if shown < n_total:
        notes.append(f"showing the first {shown} of {n_total} tokens")
    return TokenViewData(
        model_id=model_id(model),
        title=title,
        tokens=tokens,
        token_ids=[int(t) for t in encoded.token_ids[:shown]],
        positions=list(range(shown)),
        scored=[bool(s) for s in encoded.scored[:shown]],
        input_surprise=_plain(surprise[:shown].float().cpu().numpy()),
        output_entropy=_plain(entropy[:shown].float().cpu().numpy()),
        hooks=list(hooks),
        decoded_surprise=decoded,
        attribution=attributed,
        steer_hook=steering.hook,
        strength=float(strength),
        steer_plus=_plain(change[0, :shown]),
        steer_minus=_plain(change[1, :shown]),
        top_next=top_next,
        n_tokens_total=n_total,
        notes=notes,
    )


_CSS = """
.sp-tv{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:100%;margin:8px 0}
.sp-tv .controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin-bottom:8px;font-size:14px}
.sp-tv select{font-size:14px;padding:2px 4px}
.sp-tv .scale{display:flex;align-items:center;gap:6px;font-size:12px;color:#444}
.sp-tv .bar{width:160px;height:12px;border:1px solid #bbb;border-radius:2px}
.sp-tv .text{line-height:2.15;font-size:15px;font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;
  border:1px solid #ddd;border-radius:4px;padding:10px 12px;background:#fff;white-space:normal;word-break:break-word}
.sp-tv .tok{padding:1px 1px;border-radius:3px;white-space:pre;cursor:default;position:relative;
  border-bottom:2px solid transparent}
.sp-tv .tok.scored{border-bottom:2px solid #111}
.sp-tv .tok.special{font-size:11px;color:#555;outline:1px dashed #aaa}
.sp-tv .tok:hover{outline:2px solid #f0a000}
.sp-tv .pos{font-size:9px;color:#777;vertical-align:super;margin:0 1px 0 3px;user-select:none}
.sp-tv .tip{position:fixed;z-index:1000;display:none;background:#fff;border:1px solid #888;border-radius:4px;
  box-shadow:0 2px 8px rgba(0,0,0,.25);padding:8px 10px;font-size:12px;line-height:1.45;max-width:380px;pointer-events:none}
.sp-tv .tip table{border-collapse:collapse}.sp-tv .tip td{padding:0 8px 0 0}
.sp-tv .legend{font-size:12px;color:#555;margin-top:6px}
.sp-tv .legend .ex{border-bottom:2px solid #111;padding:0 3px}
"""

_JS = r"""
(function(){
const root=document.getElementById(%(id)s); if(!root) return;
const D=JSON.parse(document.getElementById(%(id)s+"-data").textContent);
const qSel=root.querySelector("select.quantity"), lSel=root.querySelector("select.layer");
const text=root.querySelector(".text"), tip=root.querySelector(".tip");
const lo=root.querySelector(".lo"), hi=root.querySelector(".hi"), bar=root.querySelector(".bar");
const Q={
 surprise:{label:"input surprise (nats)",get:(l)=>D.input_surprise,signed:false,layer:false},
 entropy:{label:"output entropy (nats)",get:(l)=>D.output_entropy,signed:false,layer:false},
 decoded:{label:"probe's decoded surprise (nats)",get:(l)=>D.decoded_surprise[l]||null,signed:false,layer:true},
 plus:{label:"entropy change, steering +"+D.strength+" std (nats)",get:(l)=>D.steer_plus,signed:true,layer:false},
 minus:{label:"entropy change, steering -"+D.strength+" std (nats)",get:(l)=>D.steer_minus,signed:true,layer:false},
 attribution:{label:"attribution of H_t to the direction (nats)",get:(l)=>D.attribution[l]||null,signed:true,layer:true}};
function mix(a,b,t){return a.map((v,i)=>Math.round(v+(b[i]-v)*t));}
const WHITE=[255,255,255],RED=[178,24,43],ORANGE=[244,165,130],BLUE=[33,102,172],LBLUE=[146,197,222];
function colour(v,lo,hi,signed){
 if(v===null||v===undefined) return null;
 if(signed){const m=Math.max(Math.abs(lo),Math.abs(hi))||1; const t=Math.max(-1,Math.min(1,v/m));
  return t>=0?(t<.5?mix(WHITE,ORANGE,t*2):mix(ORANGE,RED,(t-.5)*2)):(-t<.5?mix(WHITE,LBLUE,-t*2):mix(LBLUE,BLUE,(-t-.5)*2));}
 const t=hi>lo?Math.max(0,Math.min(1,(v-lo)/(hi-lo))):0;
 return t<.5?mix(WHITE,ORANGE,t*2):mix(ORANGE,RED,(t-.5)*2);}
function lum(c){const [r,g,b]=c.map(v=>{v/=255;return v<=0.03928?v/12.92:Math.pow((v+0.055)/1.055,2.4);});
 return 0.2126*r+0.7152*g+0.0722*b;}
// black or white text, whichever contrasts more (WCAG): never dark text on a dark cell
function ink(c){const L=lum(c); return (1.05/(L+0.05))>((L+0.05)/0.05)?"#fff":"#000";}
function range(key){ // one scale per quantity, over every layer, so layers compare
 const q=Q[key]; let vals=[]; const layers=q.layer?D.hooks:[null];
 for(const l of layers){const a=q.get(l); if(a) vals=vals.concat(a.filter(v=>v!==null));}
 if(!vals.length) return [0,0]; vals.sort((a,b)=>a-b);
 const pick=(p)=>vals[Math.min(vals.length-1,Math.max(0,Math.round(p*(vals.length-1))))];
 return [pick(0.02),pick(0.98)];}
const spans=[];
D.tokens.forEach((tok,i)=>{
 if(i%%10===0){const p=document.createElement("span");p.className="pos";p.textContent=D.positions[i];text.appendChild(p);}
 const s=document.createElement("span"); s.className="tok"+(D.scored[i]?" scored":"");
 const special=/^<[^<>]+>$/.test(tok.trim())&&tok.trim().length>2;
 if(special) s.className+=" special";
 s.textContent=tok.replace(/\n/g,"\u21b5"); s.dataset.i=i; text.appendChild(s); spans.push(s);
 if(tok.includes("\n")) text.appendChild(document.createElement("br"));});
function fmt(v){return v===null||v===undefined?"n/a":(Math.abs(v)>=100?v.toFixed(1):v.toFixed(3));}
function esc(s){return s.replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function layerBars(i){
 const vals=D.hooks.map(h=>D.attribution[h]?D.attribution[h][i]:null); if(vals.every(v=>v===null)) return "";
 const m=Math.max(1e-12,...vals.map(v=>Math.abs(v||0))); const w=Math.max(3,Math.floor(300/vals.length));
 let svg='<svg width="'+(w*vals.length)+'" height="40">';
 vals.forEach((v,k)=>{const h=Math.abs(v||0)/m*19; const y=v>=0?20-h:20;
  svg+='<rect x="'+(k*w)+'" y="'+y+'" width="'+(w-1)+'" height="'+h+'" fill="'+(v>=0?"#b2182b":"#2166ac")+'"'+
   (D.hooks[k]===lSel.value?' stroke="#000"':'')+'/>';});
 return svg+'<line x1="0" x2="'+(w*vals.length)+'" y1="20" y2="20" stroke="#999"/></svg>';}
function show(ev){
 const i=+ev.target.dataset.i; const l=lSel.value;
 const dec=D.decoded_surprise[l]?D.decoded_surprise[l][i]:null;
 const att=D.attribution[l]?D.attribution[l][i]:null;
 let h="<b>position "+D.positions[i]+"</b> "+esc(JSON.stringify(D.tokens[i]))+(D.scored[i]?" (scored)":" (not scored)")+
  "<table><tr><td>input surprise</td><td>"+fmt(D.input_surprise[i])+"</td></tr>"+
  "<tr><td>output entropy</td><td>"+fmt(D.output_entropy[i])+"</td></tr>"+
  "<tr><td>decoded surprise @ "+esc(l)+"</td><td>"+fmt(dec)+"</td></tr>"+
  "<tr><td>&Delta;H steering +"+D.strength+" / -"+D.strength+"</td><td>"+fmt(D.steer_plus[i])+" / "+fmt(D.steer_minus[i])+"</td></tr>"+
  "<tr><td>attribution @ "+esc(l)+"</td><td>"+fmt(att)+"</td></tr></table>";
 const bars=layerBars(i); if(bars) h+="<div>attribution by layer (0 &rarr; "+(D.hooks.length-1)+")</div>"+bars;
 h+="<div><b>top-5 next tokens</b></div><table>"+D.top_next[i].map(([t,p])=>"<tr><td>"+esc(JSON.stringify(t))+"</td><td>"+p.toFixed(3)+"</td></tr>").join("")+"</table>";
 tip.innerHTML=h; tip.style.display="block"; move(ev);}
function move(ev){const w=tip.offsetWidth,hh=tip.offsetHeight;
 let x=ev.clientX+14,y=ev.clientY+14; if(x+w>window.innerWidth-8) x=ev.clientX-w-14; if(y+hh>window.innerHeight-8) y=ev.clientY-hh-14;
 tip.style.left=Math.max(4,x)+"px"; tip.style.top=Math.max(4,y)+"px";}
spans.forEach(s=>{s.addEventListener("mouseenter",show);s.addEventListener("mousemove",move);
 s.addEventListener("mouseleave",()=>{tip.style.display="none";});});
function paint(){
 const key=qSel.value,q=Q[key]; lSel.disabled=!q.layer; const vals=q.get(lSel.value);
 const [a,b]=range(key); lo.textContent=fmt(q.signed?-Math.max(Math.abs(a),Math.abs(b)):a);
 hi.textContent=fmt(q.signed?Math.max(Math.abs(a),Math.abs(b)):b);
 bar.style.background=q.signed?"linear-gradient(90deg,rgb(33,102,172),rgb(146,197,222),#fff,rgb(244,165,130),rgb(178,24,43))":
  "linear-gradient(90deg,#fff,rgb(244,165,130),rgb(178,24,43))";
 root.querySelector(".qlabel").textContent=q.label+(q.layer?" at "+lSel.value:"")+(vals?"":" (not computed)");
 spans.forEach((s,i)=>{const c=vals?colour(vals[i],a,b,q.signed):null;
  if(c){s.style.background="rgb("+c.join(",")+")"; s.style.color=ink(c);}
  else{s.style.background="#f1f1f1"; s.style.color="#505050";}
  s.dataset.value=vals&&vals[i]!==null?vals[i]:"";});
 root.dataset.painted=key+"|"+lSel.value;}
qSel.addEventListener("change",paint); lSel.addEventListener("change",paint); paint();
})();
"""


def _option(value: str, label: str, selected: bool = False) -> str:
    return f"<option value='{escape(value)}'{' selected' if selected else ''}>{escape(label)}</option>"


def token_view_html(data: TokenViewData | Mapping, element_id: str = "token-view") -> str:
    """The view as an HTML fragment (a ``<div>`` with its data, CSS and script; no plotly).

    Several views can share a page if their ``element_id`` differ.

    >>> from surprise_probe.testing import tiny_model
    >>> from surprise_probe.interventions import SteeringDirection
    >>> model = tiny_model()
    >>> d = SteeringDirection(torch.ones(64) / 8, "blocks.1.hook_resid_post", std=1.0)
    >>> html = token_view_html(token_view_data(model, "Hi there.", d, attribution=False))
    >>> html.startswith("<div class='sp-tv'"), "select class='layer'" in html
    (True, True)
    """
    payload = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    if not all(ch.isalnum() or ch in "-_" for ch in element_id):
        raise ValueError(f"element_id must be letters, digits, '-' or '_', got {element_id!r}")
    hooks = payload["hooks"]
    if payload.get("steer_hook") in hooks:  # open at the direction's own layer
        default_layer = payload["steer_hook"]
    else:
        default_layer = next((h for h in hooks if h in payload["decoded_surprise"]), hooks[len(hooks) // 2] if hooks else "")
    quantities = [("surprise", "input surprise"), ("entropy", "output entropy"),
                  ("decoded", "probe's decoded surprise (per layer)"),
                  ("plus", f"entropy change, steering +{payload['strength']:g} std"),
                  ("minus", f"entropy change, steering -{payload['strength']:g} std"),
                  ("attribution", "attribution of entropy to the direction (per layer)")]
    data_json = json.dumps(payload, allow_nan=False).replace("</", "<\\/")
    notes = "; ".join(payload.get("notes") or [])
    title = escape(payload.get("title") or f"{payload['model_id']} reading one input")
    return (
        f"<div class='sp-tv' id='{element_id}'><style>{_CSS}</style>"
        f"<div class='controls'><b>{title}</b>"
        f"<label>colour by <select class='quantity'>"
        + "".join(_option(k, label, k == "surprise") for k, label in quantities)
        + "</select></label><label>layer <select class='layer'>"
        + "".join(_option(h, h, h == default_layer) for h in hooks)
        + "</select></label>"
        "<span class='scale'><span class='lo'></span><span class='bar'></span><span class='hi'></span>"
        "<span class='qlabel'></span></span></div>"
        "<div class='text'></div><div class='tip'></div>"
        f"<div class='legend'><span class='ex'>underlined</span>: scored span (the tokens metrics average over); "
        f"small numbers: token positions; grey: value not defined (e.g. surprise at position 0). Steering adds the "
        f"direction at {escape(payload['steer_hook'])}, every position. Hover a token for every value and the "
        f"top-5 next tokens.{(' ' + escape(notes) + '.') if notes else ''}</div>"
        f"<script type='application/json' id='{element_id}-data'>{data_json}</script>"
        f"<script>{_JS % {'id': json.dumps(element_id)}}</script></div>"
    )
