/* Attention-token report renderer: the one renderer behind the server's /attention page and
   sglang.attention_tokens.save_html / render_html. The report format is in
   docs/attention_tokens.md. Plain ES5 over the DOM, no dependencies, no network.

   AttnView(root) builds the view inside `root`; view.set(doc) (re)draws it for
   doc = {report, tokens, title}, where tokens (optional) is the text of every position from 0,
   and keeps the selected layer, head and pinned token across calls, so a streaming page can call
   it as entries arrive. Highlighted tokens carry the class "hl" and data-score. */
(function (global) {
  "use strict";

  var STATS = [
    ["entropy", "entropy (nats)"],
    ["sink_mass", "sink mass (position 0)"],
    ["prompt_mass", "prompt mass"],
    ["completion_mass", "completion mass"],
    ["mean_distance", "mean distance"]
  ];

  function esc(s) {
    return String(s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function fmt(x) {
    return typeof x === "number" ? x.toFixed(4) : String(x);
  }
  function keys(o) {
    return o && typeof o === "object" && !Array.isArray(o) ? Object.keys(o) : [];
  }
  function numSort(a) {
    return a.sort(function (x, y) { return (+x) - (+y); });
  }
  // Visible text: newlines as a return mark (and a real break), tabs marked, empty as a dot.
  function display(t) {
    if (t === "") return "\u2205";
    return String(t).replace(/\r/g, "").replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u21e5\t");
  }

  /* ------------------------------------------------------------------ reading a report */

  function perLayer(report) {
    if (report.layer_aggregation) return report.layer_aggregation === "none";
    return (report.content || []).some(function (e) { return e.layers; });
  }
  function layerLabels(report) {
    if (!perLayer(report)) return ["mean"];
    var seen = {};
    (report.layers || []).forEach(function (l) { seen[String(l)] = 1; });
    allEntries(report).forEach(function (e) {
      keys(e.layers).forEach(function (l) { seen[l] = 1; });
    });
    return numSort(Object.keys(seen));
  }
  function allEntries(report) {
    return (report.prompt_content || []).concat(report.content || []);
  }
  // A mass for the selected layer and head: a number, or dicts keyed by layer (per-layer
  // reports), then by head (head aggregation "none").
  function massAt(value, label, head) {
    if (value != null && typeof value === "object" && label !== "mean") value = value[label];
    if (value != null && typeof value === "object") value = head === "all" ? null : value[head];
    return value;
  }
  // The per-head lists of an entry for one layer: entry.heads {h: list} (layers averaged) or
  // entry.layers[L].heads (per layer).
  function headsOf(entry, label) {
    if (label === "mean") return entry.heads || null;
    var v = (entry.layers || {})[label];
    return v && !Array.isArray(v) ? v.heads || null : null;
  }
  // Whether entries carry head-aggregated lists (not only per-head ones).
  function hasAggregate(report) {
    return allEntries(report).some(function (e) {
      if (e.top_attention) return true;
      return keys(e.layers).some(function (l) { return Array.isArray(e.layers[l]); });
    });
  }
  function headLabels(report, labels) {
    var seen = {};
    allEntries(report).forEach(function (e) {
      labels.forEach(function (l) { keys(headsOf(e, l)).forEach(function (h) { seen[h] = 1; }); });
    });
    return numSort(Object.keys(seen));
  }
  function tops(entry, label, head) {
    if (head !== "all") {
      var hs = headsOf(entry, label);
      return (hs && hs[head]) || [];
    }
    if (label === "mean") return entry.top_attention || [];
    var v = (entry.layers || {})[label];
    return Array.isArray(v) ? v : [];
  }
  function tokenTexts(report, given) {
    var known = {}, n = (report.prompt_tokens || 0) + (report.content || []).length;
    allEntries(report).forEach(function (e) {
      if (e.token != null) known[e.position] = e.token;
      n = Math.max(n, e.position + 1);
      var lists = [e.top_attention || []];
      keys(e.layers).forEach(function (l) {
        var v = e.layers[l];
        if (Array.isArray(v)) lists.push(v);
        else keys(v && v.heads).forEach(function (h) { lists.push(v.heads[h]); });
      });
      keys(e.heads).forEach(function (h) { lists.push(e.heads[h]); });
      lists.forEach(function (list) {
        list.forEach(function (a) {
          if (!(a.position in known) && a.token != null) known[a.position] = a.token;
        });
      });
    });
    given = given || [];
    n = Math.max(n, given.length);
    var out = [];
    for (var p = 0; p < n; p++) {
      if (p < given.length && given[p] != null) out.push(given[p]);
      else if (p in known) out.push(known[p]);
      else out.push(null);
    }
    return out;
  }

  /* ------------------------------------------------------------------ the view */

  function AttnView(root) {
    this.root = root;
    this.layer = null;
    this.head = "all";
    this.pinned = null; // {kind: "gen"|"prompt", i}
    this.hover = null;
    root.classList.add("attn-view");
  }

  AttnView.prototype.set = function (doc) {
    this.doc = doc;
    var report = doc.report || { content: [] };
    this.report = report;
    this.labels = layerLabels(report);
    if (this.labels.indexOf(this.layer) < 0) this.layer = this.labels[0];
    this.heads = headLabels(report, this.labels);
    this.headChoices = (hasAggregate(report) || !this.heads.length ? ["all"] : []).concat(this.heads);
    if (this.headChoices.indexOf(this.head) < 0) this.head = this.headChoices[0];
    this.tokens = tokenTexts(report, doc.tokens);
    if (this.pinned === null && (report.content || []).length) this.pinned = { kind: "gen", i: 0 };
    this.draw();
  };

  AttnView.prototype.entry = function (sel) {
    if (!sel) return null;
    var list = sel.kind === "gen" ? this.report.content : this.report.prompt_content;
    return (list || [])[sel.i] || null;
  };

  AttnView.prototype.draw = function () {
    var self = this, r = this.report, root = this.root;
    root.innerHTML = "";
    if (this.doc.title) root.appendChild(el("h1", null, this.doc.title));
    var meta = [
      "top_k=" + r.top_k, "layers=" + JSON.stringify(r.layers),
      "layer aggregation=" + (r.layer_aggregation || "mean"),
      "head aggregation=" + (r.head_aggregation || "mean"),
      "prompt tokens=" + r.prompt_tokens, "generated tokens=" + (r.content || []).length
    ];
    if (r.heads) meta.push("heads=" + JSON.stringify(r.heads));
    if (r.spans) meta.push("spans=" + r.spans.map(function (s) { return s.name + " [" + s.start + ", " + s.end + ")"; }).join(", "));
    if (r.exclude_sink) meta.push("positions < " + r.exclude_sink + " excluded from the ranking");
    root.appendChild(el("div", "meta", meta.join(" \u00b7 ")));

    var controls = el("div", "controls");
    this.layerSel = this.select(controls, "layer", "Layer", this.labels, this.layer, function (l) {
      return l === "mean" ? "mean of " + JSON.stringify(r.layers) : "layer " + l;
    }, function (v) { self.layer = v; self.show(); });
    if (this.heads.length) {
      this.headSel = this.select(controls, "head", "Head", this.headChoices, this.head,
        function (h) { return h === "all" ? "aggregate (" + (r.head_aggregation || "mean") + ")" : "head " + h; },
        function (v) { self.head = v; self.show(); });
    } else {
      this.headSel = null;
    }
    root.appendChild(controls);

    var text = el("div", "text"), gen = {}, prm = {};
    (r.content || []).forEach(function (e, i) { gen[e.position] = i; });
    (r.prompt_content || []).forEach(function (e, i) { prm[e.position] = i; });
    var n0 = r.prompt_tokens || 0, sink = r.exclude_sink || 0;
    this.byPos = {};
    this.tokens.forEach(function (t, p) {
      if (p === n0 && p > 0) {
        var s = el("span", "sep", "\u2016");
        s.title = "completion starts here";
        text.appendChild(s);
      }
      var span = el("span", "tok", t == null ? "[" + p + "]" : display(t));
      span.dataset.pos = p;
      span.title = p + ": " + (t == null ? "token text unknown" : JSON.stringify(t)) +
        " (" + (p < n0 ? "prompt" : "completion") + ")";
      if (t == null) span.classList.add("unk");
      if (p < sink) span.classList.add("sink");
      var sel = null;
      if (p in gen) { span.classList.add("gen"); span.dataset.gen = gen[p]; sel = { kind: "gen", i: gen[p] }; }
      else if (p in prm) { span.classList.add("qp"); span.dataset.prompt = prm[p]; sel = { kind: "prompt", i: prm[p] }; }
      if (sel) {
        span.addEventListener("mouseenter", function () { self.hover = sel; self.show(); });
        span.addEventListener("mouseleave", function () { self.hover = null; self.show(); });
        span.addEventListener("click", function () {
          var same = self.pinned && self.pinned.kind === sel.kind && self.pinned.i === sel.i;
          self.pinned = same ? null : sel;
          self.show();
        });
      }
      self.byPos[p] = span;
      text.appendChild(span);
    });
    root.appendChild(text);
    this.detail = el("div", "detail");
    root.appendChild(this.detail);
    this.show();
  };

  AttnView.prototype.select = function (parent, cls, label, values, current, name, onChange) {
    var lab = el("label", null, label + ": "), sel = el("select", cls);
    values.forEach(function (v) {
      var o = el("option", null, name(v));
      o.value = v;
      sel.appendChild(o);
    });
    sel.value = current;
    sel.addEventListener("change", function () { onChange(sel.value); });
    lab.appendChild(sel);
    parent.appendChild(lab);
    return sel;
  };

  AttnView.prototype.show = function () {
    var self = this, sel = this.hover || this.pinned, e = this.entry(sel);
    Object.keys(this.byPos).forEach(function (p) {
      var s = self.byPos[p];
      s.style.backgroundColor = "";
      s.classList.remove("hl", "sel", "query");
      delete s.dataset.score;
    });
    if (!e) {
      this.detail.innerHTML = "<em>Hover over or click a generated token.</em>";
      return;
    }
    var L = this.layer, top = tops(e, L, this.head), mx = 0;
    var query = sel.kind === "gen" ? e.position - 1 : e.position;
    top.forEach(function (a) { mx = Math.max(mx, a.score); });
    top.forEach(function (a) {
      var s = self.byPos[a.position];
      if (!s) return;
      s.classList.add("hl");
      s.dataset.score = a.score;
      s.style.backgroundColor = "rgba(232,89,12," + (0.1 + 0.9 * (mx > 0 ? a.score / mx : 0)).toFixed(3) + ")";
    });
    if (this.byPos[e.position]) this.byPos[e.position].classList.add("sel");
    if (this.byPos[query] && query !== e.position) this.byPos[query].classList.add("query");

    var h = "<b>" + (sel.kind === "gen" ? "#" + sel.i + " " : "prompt ") +
      esc(JSON.stringify(e.token)) + "</b> at position " + e.position + " (query position " + query +
      "), layer <b>" + esc(L) + "</b>" + (this.head === "all" ? "" : ", head <b>" + esc(this.head) + "</b>");
    var cm = massAt(e.captured_mass, L, this.head), xm = massAt(e.excluded_mass, L, this.head);
    if (cm != null) h += ", captured mass " + fmt(cm);
    if (xm != null) h += ", excluded mass (positions &lt; " + this.report.exclude_sink + ") " + fmt(xm);
    h += '<table class="topk"><tr><th>rank</th><th>position</th><th>token</th><th>source</th>' +
      "<th>score</th><th></th></tr>";
    var n0 = this.report.prompt_tokens || 0;
    top.forEach(function (a, i) {
      var t = self.tokens[a.position];
      h += '<tr><td class="num">' + (i + 1) + '</td><td class="num">' + a.position + "</td><td><code>" +
        esc(JSON.stringify(t == null ? a.token : t)) + "</code></td><td>" +
        (a.source || (a.position < n0 ? "prompt" : "completion")) + '</td><td class="num">' +
        fmt(a.score) + '</td><td><span class="bar" style="width:' + Math.round(a.score * 200) +
        'px"></span></td></tr>';
    });
    h += "</table>";

    var spans = e.span_mass;
    if (keys(spans).length) {
      h += '<h3>Span mass <small>(the selected layers and heads together)</small></h3><table class="spans">';
      keys(spans).forEach(function (name) {
        var m = spans[name];
        h += "<tr><td>" + esc(name) + '</td><td class="num">' + fmt(m) +
          '</td><td><span class="bar span" style="width:' + Math.round(m * 300) + 'px"></span></td></tr>';
      });
      h += "</table>";
    }
    var stats = STATS.filter(function (s) { return e[s[0]] != null; });
    if (stats.length) {
      h += '<h3>Statistics <small>(the selected layers and heads together)</small></h3><table class="stats">';
      stats.forEach(function (s) {
        h += "<tr><td>" + s[1] + '</td><td class="num">' + fmt(e[s[0]]) + "</td></tr>";
      });
      h += "</table>";
    }
    var lens = e.logit_lens, lensLayers = numSort(keys(lens));
    if (lensLayers.length) {
      h += '<h3>Logit lens</h3><table class="lens"><tr><th>layer</th><th>top tokens (logprob)</th></tr>';
      lensLayers.forEach(function (l) {
        h += '<tr><td class="num">' + esc(l) + "</td><td>" + lens[l].map(function (c) {
          return "<code>" + esc(JSON.stringify(c.token)) + "</code> " + fmt(c.logprob);
        }).join(" \u00b7 ") + "</td></tr>";
      });
      h += "</table>";
    }
    this.detail.innerHTML = h;
  };

  // The report inside an OpenAI / native response, or the document itself.
  function findReport(obj) {
    if (Array.isArray(obj)) obj = obj[0];
    if (!obj || typeof obj !== "object") return null;
    if (obj.report) return findReport(obj.report);
    if (Array.isArray(obj.content) && !obj.choices) return obj;
    if (obj.choices && obj.choices[0]) return obj.choices[0].attention_tokens || null;
    if (obj.meta_info) return obj.meta_info.attention_tokens || null;
    return null;
  }

  // Draw the document held by the JSON <script class="attn-data"> inside element `hostId`
  // (render_html's output), replacing its plain-text fallback.
  function mount(hostId) {
    var host = document.getElementById(hostId);
    var doc = JSON.parse(host.querySelector("script.attn-data").textContent);
    var fallback = host.querySelector(".attn-fallback");
    if (fallback) fallback.parentNode.removeChild(fallback);
    var view = new AttnView(host.querySelector(".attn-mount"));
    view.set(doc);
    host.attnView = view;
    return view;
  }

  global.AttnView = AttnView;
  global.AttnView.mount = mount;
  global.AttnView.findReport = findReport;
  global.AttnView.tokenTexts = tokenTexts;
})(window);
