(() => {
  const table = document.getElementById('latents');
  const tbody = table.tBodies[0];
  const rows = Array.from(tbody.rows);
  const order = new Map(rows.map((r, i) => [r, i]));
  const q = document.getElementById('q');
  const kind = document.getElementById('kind');
  const count = document.getElementById('count');
  function applyFilter() {
    const needle = q.value.trim().toLowerCase().replace(/^#/, '');
    let shown = 0;
    for (const r of rows) {
      const ok = (kind.value === 'all' || r.dataset.kind === kind.value) &&
        (needle === '' || r.dataset.search.includes(needle));
      r.hidden = !ok;
      if (ok) shown += 1;
    }
    count.textContent = shown + ' of ' + rows.length + ' latents shown';
  }
  function value(r, key, numeric) {
    const v = r.dataset[key];
    if (!numeric) return v;
    const x = parseFloat(v);
    return Number.isNaN(x) ? null : x;
  }
  function sortBy(th) {
    const key = th.dataset.key;
    const numeric = th.dataset.type === 'num';
    const cur = th.getAttribute('aria-sort');
    const dir = cur === 'descending' ? 'ascending' : cur === 'ascending' ? 'descending'
      : (numeric ? 'descending' : 'ascending');
    for (const h of table.tHead.rows[0].cells) if (h.dataset.key) h.setAttribute('aria-sort', 'none');
    th.setAttribute('aria-sort', dir);
    const sign = dir === 'ascending' ? 1 : -1;
    const sorted = rows.slice().sort((a, b) => {
      const va = value(a, key, numeric);
      const vb = value(b, key, numeric);
      let c;
      if (va === null || vb === null) c = (va === null) - (vb === null);
      else c = sign * (numeric ? va - vb : va.localeCompare(vb));
      return c || order.get(a) - order.get(b);
    });
    tbody.append(...sorted);
  }
  for (const th of table.tHead.rows[0].cells) {
    const b = th.querySelector('button');
    if (b) b.addEventListener('click', () => sortBy(th));
  }
  q.addEventListener('input', applyFilter);
  kind.addEventListener('change', applyFilter);
  applyFilter();
})();