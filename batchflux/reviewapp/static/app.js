/* batchflux review: the page. Plain JavaScript, no build step, nothing external.
 *
 * Views by URL fragment: #sheet, #grid-seed, #grid-aspect, #compare/<group number>.
 * Filter by query string: ?show=undecided|accepted|rejected|starred|failed.
 * A reroll (run --reroll rejected) comes right after its original in every view (the server
 * orders the items and puts it in its original's grid cell) and is labelled as one.
 * Every decision is POSTed to /api/decisions (one line of OUT/review.jsonl) before the page
 * shows it; posts go one at a time, in order. User text is only ever set as textContent.
 */
(function () {
  'use strict';

  var STATE_OF = { accept: 'accepted', reject: 'rejected', star: 'starred' };
  var BUTTONS = [['accept', 'Accept'], ['reject', 'Reject'], ['star', 'Star']];
  var FILTERS = ['all', 'undecided', 'accepted', 'rejected', 'starred', 'failed'];
  var VIEWS = { 'sheet': 1, 'grid-seed': 1, 'grid-aspect': 1 };

  var run = null;           // /api/run without decisions
  var byKey = {};           // key -> item
  var decisions = {};       // key -> {key, decision, time, note?}
  var filter = 'all';
  var selected = null;      // key of the selected card
  var undoStack = [];       // [{key, previous}] of this tab's decisions
  var queue = Promise.resolve();
  var pending = 0;

  var main = document.getElementById('view');
  var toastBox = document.getElementById('toast');
  var toastTimer = null;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      var value = attrs[name];
      if (value === null || value === undefined || value === false) { return; }
      if (name === 'text') { node.textContent = value; } else { node.setAttribute(name, value); }
    });
    (children || []).forEach(function (child) { if (child) { node.appendChild(child); } });
    return node;
  }

  function toast(message) {
    toastBox.textContent = message;
    toastBox.className = 'shown';
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { toastBox.className = ''; }, 4000);
  }

  function stateOf(item) {
    if (item.failed) { return 'failed'; }
    var d = decisions[item.key];
    return d ? STATE_OF[d.decision] : 'undecided';
  }

  function chips(pairs) {
    if (!pairs.length) { return null; }
    return el('ul', { 'class': 'chips' }, pairs.map(function (pair) {
      return el('li', {}, [el('span', { text: pair[0] }), document.createTextNode(pair[1])]);
    }));
  }

  // ---------------------------------------------------------------------------------------
  // Routing

  function route() {
    var hash = location.hash.replace(/^#/, '');
    var compare = /^compare\/(\d+)$/.exec(hash);
    if (compare) {
      var number = Math.min(parseInt(compare[1], 10), Math.max(run.groups.length - 1, 0));
      return { view: 'compare', group: number };
    }
    return { view: VIEWS[hash] ? hash : 'sheet' };
  }

  function readFilter() {
    var show = new URLSearchParams(location.search).get('show');
    filter = FILTERS.indexOf(show) >= 0 ? show : 'all';
  }

  function setFilter(name) {
    filter = name;
    var url = new URL(location.href);
    if (name === 'all') { url.searchParams.delete('show'); } else { url.searchParams.set('show', name); }
    history.replaceState(null, '', url.pathname + url.search + url.hash);
    applyFilter();
  }

  // ---------------------------------------------------------------------------------------
  // Rendering

  // A reroll (run --reroll rejected) says what it rerolls: "reroll 1 of seed 1002 · 1:1".
  function rerollTag(item) {
    return item.reroll ? el('span', { 'class': 'reroll-tag', text: item.reroll }) : null;
  }

  function card(item, large) {
    var attrs = { 'class': 'card' + (item.failed ? ' failed' : '') + (item.reroll ? ' reroll' : '') +
                         (item.stale ? ' stale' : ''),
                  'data-key': item.key, 'data-state': stateOf(item), 'tabindex': '-1',
                  'data-reroll-of': item.reroll ? item.reroll_of : null,
                  'data-attempt': item.reroll ? String(item.attempt) : null,
                  'aria-label': item.reroll ? item.reroll + ': ' + item.label : item.label };
    if (item.failed) {
      return el('article', attrs, [
        el('div', { 'class': 'reason' }, [
          el('span', { 'class': 'category', text: 'failed: ' + item.error.category }),
          item.error.explanation ? el('p', { 'class': 'explanation', text: item.error.explanation }) : null,
          el('p', { 'class': 'message', text: item.error.message })
        ]),
        el('div', { 'class': 'caption' }, [rerollTag(item), el('b', { text: item.label }), staleNote(item),
                                           chips(item.varying)])
      ]);
    }
    var images = large ? item.images : item.images.slice(0, 1);
    var frames = images.map(function (image) {
      return el('a', { 'class': 'frame', href: image.full, target: '_blank', rel: 'noopener' }, [
        el('img', { src: large ? image.full : image.thumb, alt: item.label, loading: 'lazy',
                    width: image.width, height: image.height })
      ]);
    });
    var more = !large && item.images.length > 1
      ? el('span', { 'class': 'more', text: '+' + (item.images.length - 1) + ' more' }) : null;
    var node = el('article', attrs, frames.concat([
      el('span', { 'class': 'badge', text: stateOf(item) }),
      el('div', { 'class': 'caption' }, [rerollTag(item), el('b', { text: item.label }), more,
                                         staleNote(item),
                                         chips(item.varying)]),
      el('div', { 'class': 'actions' }, BUTTONS.map(function (b) {
        return el('button', { type: 'button', 'data-decision': b[0], 'aria-pressed': 'false',
                              text: b[1] });
      }))
    ]));
    paint(node, item);
    return node;
  }

  // A result of an item the current manifest no longer has (shown with --all only).
  function staleNote(item) {
    return item.stale ? el('span', { 'class': 'stale-note', text: 'not in the manifest' }) : null;
  }

  function paint(node, item) {
    var state = stateOf(item);
    node.setAttribute('data-state', state);
    var badge = node.querySelector('.badge');
    if (badge) { badge.textContent = state; }
    node.querySelectorAll('.actions button').forEach(function (button) {
      var on = STATE_OF[button.getAttribute('data-decision')] === state;
      button.setAttribute('aria-pressed', on ? 'true' : 'false');
    });
  }

  function groupHead(group, tag, withCompare) {
    return el(tag, { 'class': 'group-head', 'data-group': String(group.number) }, [
      el('span', { 'class': 'prompt-id', text: group.prompt_id }),
      el('span', { 'class': 'prompt-text', text: group.prompt }),
      withCompare ? el('a', { 'class': 'compare', href: '#compare/' + group.number,
                              text: 'compare' }) : null,
      chips(group.common)
    ]);
  }

  function itemsOf(group) {
    return run.items.filter(function (item) { return item.group === group.number; });
  }

  function renderSheet() {
    return el('div', { id: 'sheet', 'class': 'view' }, run.groups.map(function (group) {
      return el('section', { 'class': 'group', 'data-group': String(group.number) }, [
        groupHead(group, 'header', true),
        el('div', { 'class': 'cards' }, itemsOf(group).map(function (item) { return card(item); }))
      ]);
    }));
  }

  function renderGrid(axis) {
    var columns = run.axes[axis];
    var cells = [el('div', { 'class': 'corner', text: 'prompt' })];
    columns.forEach(function (c) {
      cells.push(el('div', { 'class': 'colhead', text: axis + ' ' + c }));
    });
    run.groups.forEach(function (group) {
      var mine = itemsOf(group);
      cells.push(groupHead(group, 'div', true));
      columns.forEach(function (c) {
        cells.push(el('div', { 'class': 'cell' }, mine.filter(function (item) {
          return item[axis] === c;
        }).map(function (item) { return card(item); })));
      });
    });
    var grid = el('div', { 'class': 'grid' }, cells);
    grid.style.setProperty('--columns', String(columns.length));
    return el('div', { id: 'grid-' + axis, 'class': 'view' }, [grid]);
  }

  function renderCompare(number) {
    var group = run.groups[number];
    if (!group) { return el('p', { 'class': 'empty', text: 'This run has no items.' }); }
    var last = run.groups.length - 1;
    return el('div', { id: 'compare', 'class': 'view', 'data-group': String(number) }, [
      el('div', { 'class': 'compare-nav' }, [
        number > 0 ? el('a', { href: '#compare/' + (number - 1), text: '← previous prompt' }) : null,
        el('span', { text: 'prompt ' + (number + 1) + ' of ' + (last + 1) }),
        number < last ? el('a', { href: '#compare/' + (number + 1), text: 'next prompt →' }) : null
      ]),
      groupHead(group, 'header', false),
      el('div', { 'class': 'cards large' }, itemsOf(group).map(function (item) {
        return card(item, true);
      }))
    ]);
  }

  function render() {
    var where = route();
    var view = where.view === 'compare' ? renderCompare(where.group)
      : where.view === 'sheet' ? renderSheet() : renderGrid(where.view.slice(5));
    main.replaceChildren(view);
    document.body.setAttribute('data-view', where.view);
    document.querySelectorAll('nav.views a').forEach(function (a) {
      if (a.getAttribute('data-view') === where.view) {
        a.setAttribute('aria-current', 'page');
      } else {
        a.removeAttribute('aria-current');
      }
    });
    if (where.view === 'compare') {
      document.getElementById('compare-link').setAttribute('href', '#compare/' + where.group);
    }
    applyFilter();
    if (selected && cardOf(selected)) { select(selected, false); } else { selected = null; }
    window.scrollTo(0, 0);
  }

  function applyFilter() {
    document.querySelectorAll('.filters button').forEach(function (button) {
      button.setAttribute('aria-pressed',
                          button.getAttribute('data-filter') === filter ? 'true' : 'false');
    });
    main.querySelectorAll('.card').forEach(function (node) {
      var state = node.getAttribute('data-state');
      node.hidden = !(filter === 'all' || state === filter);
    });
    main.querySelectorAll('section.group').forEach(function (section) {
      section.hidden = !section.querySelector('.card:not([hidden])');
    });
    if (selected && (!cardOf(selected) || cardOf(selected).hidden)) {
      unselect();
    }
    updateCounts();
  }

  function updateCounts() {
    var counts = { all: 0, undecided: 0, accepted: 0, rejected: 0, starred: 0, failed: 0 };
    run.items.forEach(function (item) { counts.all += 1; counts[stateOf(item)] += 1; });
    Object.keys(counts).forEach(function (name) {
      document.querySelector('[data-count="' + name + '"]').textContent = String(counts[name]);
    });
  }

  // ---------------------------------------------------------------------------------------
  // Selection and moving

  function cardOf(key) {
    return main.querySelector('.card[data-key="' + CSS.escape(key) + '"]');
  }

  function visibleCards() {
    return Array.prototype.slice.call(main.querySelectorAll('.card:not(.failed):not([hidden])'));
  }

  function unselect() {
    main.querySelectorAll('.card.selected').forEach(function (n) { n.classList.remove('selected'); });
    selected = null;
  }

  function select(key, scroll) {
    unselect();
    var node = cardOf(key);
    if (!node) { return; }
    selected = key;
    node.classList.add('selected');
    if (scroll !== false) {
      node.focus({ preventScroll: true });
      node.scrollIntoView({ block: 'nearest' });
    }
  }

  function neighbour(step) {
    var cards = visibleCards();
    if (!cards.length) { return null; }
    var at = cards.findIndex(function (n) { return n.getAttribute('data-key') === selected; });
    if (at < 0) { return cards[step > 0 ? 0 : cards.length - 1].getAttribute('data-key'); }
    var next = Math.min(Math.max(at + step, 0), cards.length - 1);
    return cards[next].getAttribute('data-key');
  }

  // ---------------------------------------------------------------------------------------
  // Decisions

  function post(key, decision) {
    return fetch('/api/decisions', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ key: key, decision: decision })
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) { throw new Error(body.error || ('HTTP ' + response.status)); }
        return body;
      });
    });
  }

  function applyLine(line) {
    if (line.decision === 'clear') { delete decisions[line.key]; } else { decisions[line.key] = line; }
    var node = cardOf(line.key);
    if (node) { paint(node, byKey[line.key]); }
    applyFilter();
  }

  // Runs ``task`` after every earlier decision has been written, so lines land in click order.
  function enqueue(task) {
    pending += 1;
    queue = queue.then(task).catch(function (error) { toast('Not saved: ' + error.message); })
      .then(function () { pending -= 1; });
    return queue;
  }

  function decide(key, decision) {
    var item = byKey[key];
    if (!item || item.failed) { return; }
    enqueue(function () {
      var previous = decisions[key] ? decisions[key].decision : 'clear';
      var next = previous === decision ? 'clear' : decision;  // pressing it again clears it
      return post(key, next).then(function (line) {
        undoStack.push({ key: key, previous: previous });
        applyLine(line);
      });
    });
  }

  function undo() {
    var last = undoStack.pop();
    if (!last) { toast('Nothing to undo'); return; }
    enqueue(function () {
      return post(last.key, last.previous).then(function (line) {
        applyLine(line);
        if (cardOf(last.key) && !cardOf(last.key).hidden) { select(last.key); }
      });
    });
  }

  function refreshDecisions() {
    if (pending || document.visibilityState !== 'visible') { return; }
    fetch('/api/decisions').then(function (r) { return r.json(); }).then(function (fresh) {
      if (pending || JSON.stringify(fresh) === JSON.stringify(decisions)) { return; }
      decisions = fresh;  // another tab or reviewer decided something
      main.querySelectorAll('.card').forEach(function (node) {
        paint(node, byKey[node.getAttribute('data-key')]);
      });
      applyFilter();
    }).catch(function () { /* the server stopped: the next poll tries again */ });
  }

  // ---------------------------------------------------------------------------------------
  // Events

  main.addEventListener('click', function (event) {
    var button = event.target.closest('.actions button');
    var node = event.target.closest('.card');
    if (!node) { return; }
    var key = node.getAttribute('data-key');
    if (!node.classList.contains('failed')) { select(key, false); }
    if (button) { decide(key, button.getAttribute('data-decision')); }
  });

  document.querySelector('.filters').addEventListener('click', function (event) {
    var button = event.target.closest('button');
    if (button) { setFilter(button.getAttribute('data-filter')); }
  });

  document.addEventListener('keydown', function (event) {
    if (!run || event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.target.closest && event.target.closest('input, textarea, select')) { return; }
    var key = event.key;
    var decision = { a: 'accept', r: 'reject', s: 'star' }[key];
    if (decision) {
      if (!selected) { toast('Select an image first (click it, or press j)'); return; }
      var target = selected;
      var after = neighbour(1);
      decide(target, decision);
      if (after && after !== target) { select(after); }
      event.preventDefault();
    } else if (key === 'u') {
      undo();
      event.preventDefault();
    } else if (key === 'ArrowRight' || key === 'ArrowDown' || key === 'j') {
      var next = neighbour(1);
      if (next) { select(next); }
      event.preventDefault();
    } else if (key === 'ArrowLeft' || key === 'ArrowUp' || key === 'k') {
      var previous = neighbour(-1);
      if (previous) { select(previous); }
      event.preventDefault();
    }
  });

  window.addEventListener('hashchange', render);

  fetch('/api/run').then(function (response) {
    if (!response.ok) { throw new Error('HTTP ' + response.status); }
    return response.json();
  }).then(function (data) {
    decisions = data.decisions;
    delete data.decisions;
    run = data;
    run.items.forEach(function (item) { byKey[item.key] = item; });
    document.getElementById('run-name').textContent = run.run.name;
    var note = document.getElementById('manifest-note');
    note.textContent = run.run.note || '';
    note.hidden = !run.run.note;
    document.title = 'batchflux review: ' + run.run.name;
    readFilter();
    render();
    document.body.setAttribute('data-ready', 'yes');
    setInterval(refreshDecisions, 4000);
  }).catch(function (error) {
    main.replaceChildren(el('p', { 'class': 'empty', text: 'Could not load the run: ' + error.message }));
  });
})();
