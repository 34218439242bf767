// Keeps the page live: re-fetches this page every few seconds and swaps
// its <main> for the fresh one (the server renders and escapes all data;
// this script never builds markup). Open/closed sections are kept.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var every = Number(document.body.getAttribute("data-refresh-ms")) || 5000;
  var busy = false;
  function show(text, state) {
    live.textContent = text;
    live.className = "live " + state;
  }
  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        var old = document.getElementById("main");
        if (!fresh || !old) throw new Error("no content");
        var open = {};
        old.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
        fresh.querySelectorAll("details[id]").forEach(function (d) {
          if (d.id in open) d.open = open[d.id];
        });
        old.replaceWith(document.adoptNode(fresh));
        show("live · updated " + new Date().toLocaleTimeString(), "on");
      })
      .catch(function (e) { show("not updating (" + e.message + "); retrying", "off"); })
      .finally(function () { busy = false; });
  }
  show("live · every " + every / 1000 + " s", "on");
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
