// hotswap dashboard: live updates over Server-Sent Events and the filter
// box. The server renders every fragment; this only puts them in place.
// No dependencies, no build step.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  // Milliseconds from an event's time at the control plane to the page
  // showing it, for the dashboard's own measurements.
  window.hotswapLatencies = [];
  window.hotswapPatches = 0;

  function say(text) {
    if (status) status.textContent = text;
  }

  function filter() {
    var box = document.getElementById("filter");
    if (!box) return;
    var body = document.getElementById(box.getAttribute("data-filter"));
    if (!body) return;
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = body.rows || [];
    for (var i = 0; i < rows.length; i++) {
      var text = rows[i].textContent.toLowerCase();
      var shown = words.every(function (w) { return text.indexOf(w) >= 0; });
      rows[i].hidden = !shown;
    }
  }

  var box = document.getElementById("filter");
  if (box) box.addEventListener("input", filter);

  var source = document.body.getAttribute("data-live");
  if (!source || !window.EventSource) return;
  var events = new EventSource(source);
  events.onopen = function () { say("live"); };
  events.onerror = function () { say("reconnecting\u2026"); };
  events.addEventListener("patch", function (e) {
    var m = JSON.parse(e.data);
    var target = document.getElementById(m.target);
    if (!target) return;
    target.innerHTML = m.html;
    window.hotswapPatches++;
    filter();
  });
  events.addEventListener("append", function (e) {
    var m = JSON.parse(e.data);
    var target = document.getElementById(m.target);
    if (!target) return;
    var holder = document.createElement(target.tagName === "TBODY" ? "tbody" : "ol");
    holder.innerHTML = m.html;
    var item = holder.firstElementChild;
    if (!item) return;
    if (target.hasAttribute("data-newest-first")) {
      target.insertBefore(item, target.firstElementChild);
    } else {
      target.appendChild(item);
    }
    if (m.at) window.hotswapLatencies.push(Date.now() - m.at);
    filter();
  });
  events.addEventListener("problem", function (e) {
    say("stream failed: " + JSON.parse(e.data).message);
  });
})();
