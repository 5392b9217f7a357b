/* The server's /attention page (app.html): sends the form as a streaming OpenAI request with the
   attention fields, draws the report with renderer.js as entries arrive, loads and saves report
   JSON. Only fields the user set are sent, so the page works with whatever the server accepts;
   a refused field shows the server's error text. window.attnState holds the report, and
   document.body.dataset.phase (idle, running, done, loaded, error) changes only once the view is
   drawn (tests wait on it). */
(function () {
  "use strict";
  var form = document.getElementById("attn-form");
  var statusEl = document.getElementById("attn-status");
  var errorEl = document.getElementById("attn-error");
  var completionEl = document.getElementById("attn-completion");
  var runBtn = document.getElementById("attn-run");
  var stopBtn = document.getElementById("attn-stop");
  var saveBtn = document.getElementById("attn-save");
  var view = new AttnView(document.getElementById("attn-view"));
  var state = (window.attnState = { phase: "idle", report: null, tokens: null, error: null });
  var controller = null, pending = false;

  function setPhase(phase, text) {
    state.phase = phase;
    document.body.dataset.phase = phase;
    statusEl.textContent = text || "";
  }
  function showError(text) {
    state.error = text;
    errorEl.textContent = text || "";
  }
  function draw() {
    view.set({ report: state.report, tokens: state.tokens });
  }
  // While streaming: at most one draw per frame.
  function redraw() {
    if (pending) return;
    pending = true;
    window.requestAnimationFrame(function () {
      pending = false;
      draw();
    });
  }
  function ints(text, name) {
    return text.split(",").map(function (s) {
      var v = Number(s.trim());
      if (!Number.isInteger(v)) throw new Error(name + ": " + JSON.stringify(s.trim()) + " is not an integer");
      return v;
    });
  }
  function messagesOf(text) {
    var t = text.trim();
    if (t.charAt(0) === "[") return JSON.parse(t);
    return [{ role: "user", content: text }];
  }
  function headers() {
    var h = { "Content-Type": "application/json" }, key = form.api_key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }
  async function errorText(resp) {
    var text = await resp.text();
    try {
      var body = JSON.parse(text);
      return "HTTP " + resp.status + ": " + (body.message || (body.error && body.error.message) || text);
    } catch (e) {
      return "HTTP " + resp.status + ": " + text;
    }
  }

  // The request body: the OpenAI fields plus every attention field the user set.
  function requestBody(chat) {
    var f = form, body = { model: "default", stream: true, return_attention_tokens: true };
    body.max_tokens = Number(f.max_tokens.value);
    body.temperature = Number(f.temperature.value);
    body.attention_tokens_top_k = Number(f.attention_tokens_top_k.value);
    if (f.attention_layers.value.trim()) body.attention_layers = ints(f.attention_layers.value, "layers");
    if (f.attention_layer_aggregation.value !== "mean") body.attention_layer_aggregation = f.attention_layer_aggregation.value;
    if (Number(f.attention_exclude_sink.value)) body.attention_exclude_sink = Number(f.attention_exclude_sink.value);
    if (f.attention_heads.value.trim()) body.attention_heads = ints(f.attention_heads.value, "heads");
    if (f.attention_head_aggregation.value) body.attention_head_aggregation = f.attention_head_aggregation.value;
    var spans = f.attention_spans.value.trim();
    if (spans) body.attention_spans = spans === "messages" ? spans : JSON.parse(spans);
    if (f.attention_stats.checked) body.attention_stats = true;
    if (f.logit_lens.value.trim())
      body.logit_lens = { layers: ints(f.logit_lens.value, "logit lens layers"), top_n: Number(f.logit_lens_top_n.value) };
    var pp = f.attention_prompt_positions.value.trim();
    if (pp) body.attention_prompt_positions = pp === "all" ? "all" : ints(pp, "prompt positions");
    if (chat) body.messages = messagesOf(f.input.value);
    else body.prompt = f.input.value;
    return body;
  }

  function byPosition(list, add) {
    var map = {};
    (list || []).concat(add || []).forEach(function (e) { map[e.position] = e; });
    return Object.keys(map).map(Number).sort(function (a, b) { return a - b; })
      .map(function (p) { return map[p]; });
  }
  // One streamed chunk: header fields merge, entries append (each token's entry comes once).
  function absorb(chunk) {
    if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
    var choice = (chunk.choices || [])[0];
    if (!choice) return;
    var text = choice.delta ? choice.delta.content : choice.text;
    if (text) completionEl.textContent += text;
    var att = choice.attention_tokens;
    if (!att) return;
    var r = state.report || (state.report = { content: [] });
    Object.keys(att).forEach(function (k) {
      if (k !== "content" && k !== "prompt_content") r[k] = att[k];
    });
    r.content = byPosition(r.content, att.content);
    if (att.prompt_content) r.prompt_content = byPosition(r.prompt_content, att.prompt_content);
    redraw();
  }

  async function run(ev) {
    ev.preventDefault();
    var chat = form.mode.value === "chat", body;
    showError("");
    completionEl.textContent = "";
    try {
      body = requestBody(chat);
    } catch (e) {
      showError(String(e.message || e));
      return;
    }
    state.report = null;
    state.tokens = null;
    controller = new AbortController();
    runBtn.disabled = true;
    stopBtn.disabled = false;
    setPhase("running", "tokenizing the prompt ...");
    try {
      var tk = await fetch("attention/tokens", {
        method: "POST", headers: headers(),
        body: JSON.stringify(chat ? { messages: body.messages } : { prompt: body.prompt })
      });
      if (!tk.ok) throw new Error(await errorText(tk));
      state.tokens = (await tk.json()).tokens;
      state.report = { content: [], prompt_tokens: state.tokens.length };
      redraw();
      setPhase("running", "generating ...");
      var resp = await fetch(chat ? "v1/chat/completions" : "v1/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buf = "";
      for (;;) {
        var part = await reader.read();
        if (part.done) break;
        buf += decoder.decode(part.value, { stream: true });
        var events = buf.split("\n\n");
        buf = events.pop();
        events.forEach(function (evText) {
          evText.split("\n").forEach(function (line) {
            if (line.indexOf("data:") !== 0) return;
            var data = line.slice(5).trim();
            if (data && data !== "[DONE]") absorb(JSON.parse(data));
          });
        });
      }
      var n = state.report ? state.report.content.length : 0;
      draw();
      setPhase("done", "done: " + n + " generated tokens");
    } catch (e) {
      if (state.report) draw();
      if (e.name === "AbortError") setPhase("done", "stopped");
      else {
        showError(String(e.message || e));
        setPhase("error", "failed");
      }
    } finally {
      runBtn.disabled = false;
      stopBtn.disabled = true;
      saveBtn.disabled = !state.report;
      controller = null;
    }
  }

  function load(ev) {
    var file = ev.target.files[0];
    if (!file) return;
    file.text().then(function (text) {
      var report = AttnView.findReport(JSON.parse(text));
      if (!report) throw new Error(file.name + ": no attention_tokens report in this JSON");
      showError("");
      completionEl.textContent = "";
      state.report = report;
      state.tokens = report.token_strings || null;
      saveBtn.disabled = false;
      draw();
      setPhase("loaded", "loaded " + file.name + ": " + report.content.length + " generated tokens");
    }).catch(function (e) {
      showError(String(e.message || e));
      setPhase("error", "failed");
    });
  }

  // The report as JSON, with the text of every position (token_strings) for reloading.
  function save() {
    var out = Object.assign({}, state.report, { token_strings: view.tokens });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], { type: "application/json" }));
    a.download = "attention_report.json";
    a.click();
  }

  form.addEventListener("submit", run);
  stopBtn.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("attn-load").addEventListener("change", load);
  saveBtn.addEventListener("click", save);
  setPhase("idle", "");
})();
