// The API guide (/docs/).  No inline scripts (strict CSP).
//   [data-show-samples="python|node|curl|all"] buttons show only that language's samples;
//   the choice is kept for the next visit.  Without JavaScript every sample shows.
(function () {
  const group = document.querySelector(".sample-languages");
  if (!group) return;
  const KEY = "switchboard.docs.language";

  function show(language) {
    document.querySelectorAll("figure.sample[data-language]").forEach((figure) => {
      figure.hidden = language !== "all" && figure.getAttribute("data-language") !== language;
    });
    group.querySelectorAll("[data-show-samples]").forEach((button) => {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-show-samples") === language));
    });
  }

  group.hidden = false;
  group.addEventListener("click", (event) => {
    const button = event.target.closest("[data-show-samples]");
    if (!button) return;
    const language = button.getAttribute("data-show-samples");
    try { localStorage.setItem(KEY, language); } catch (error) { /* private mode */ }
    show(language);
  });
  let saved = "all";
  try { saved = localStorage.getItem(KEY) || "all"; } catch (error) { /* private mode */ }
  if (group.querySelector(`[data-show-samples="${saved}"]`)) show(saved);
})();
